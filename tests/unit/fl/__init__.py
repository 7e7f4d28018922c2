"""Unit and component tests of federated learning: rounds, selection, jobs, outbox, model cache."""
