"""The agent's error tree.

AgentError
├── IllegalTransitionError   a lifecycle event that is not allowed in the current state
├── ModelStoreError          a model blob or manifest cannot be stored or found (model_store)
├── TaskFailedError          a training task could not be completed (learning)
├── LocalDataError           the device's training data is missing or malformed (local_data)
├── InferenceError           onnxruntime could not load or run a model (onnx_runtime)
│   └── ModelLoadError           a version failed to load, match its schema or warm up (serving)
├── InputError               a prediction input does not fit the model's input schema
├── ModelUnavailableError    no model version to serve, or none to roll back to (predictions)
├── FeedbackError            a label for an unknown prediction id, or a bad label (feedback)
├── BadRequestError          an inference API body that cannot be used (api_codec)
├── ClientError              the inference API could not be reached (client)
├── TrustError               the pinned model-signing keys cannot be read (trust)
├── CompressionError         an update could not be compressed, e.g. NaN/Inf (compression)
└── TrainingError            the training child failed (train_worker, trainer)
    ├── TrainingTimeoutError     it ran past its time and was killed
    └── WorkerCrashedError       it died; the next task starts a new one

Shared with the coordinator: `protocols.config.ConfigError` (bad configuration; the daemon
exits with status 78).
"""

from __future__ import annotations

from protocols.config import ConfigError


class AgentError(Exception):
    """Base of the agent's own errors."""


class IllegalTransitionError(AgentError):
    """A lifecycle event arrived in a state where it is not allowed."""


class InferenceError(AgentError):
    """An ONNX model could not be loaded or run."""


class InputError(AgentError):
    """A prediction input does not match the model's input schema (the caller's fault)."""


__all__ = ["AgentError", "ConfigError", "IllegalTransitionError", "InferenceError", "InputError"]
