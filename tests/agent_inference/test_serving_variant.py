"""The service serves the file the manifest names (`ModelManifest.serving`): the int8
variant when the coordinator chose it, and says so in /v1/model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cloud_coordinator.bundles import Bundle, file_entries
from cloud_coordinator.variants import INT8_FILE, quantise_int8
from protocols.model_format import MODEL_FILE
from protocols.schema import Scalar
from tests.agent_inference.conftest import Bundles, new_service


def _int8_only(bundle: Bundle) -> Bundle:
    """The int8 variant chosen, and model.onnx unusable: only the variant can serve."""
    files = {**bundle.files, INT8_FILE: quantise_int8(bundle.files[MODEL_FILE]),
             MODEL_FILE: b"not an onnx model"}  # fmt: skip
    variants: dict[str, Scalar] = {"chosen": "int8", "reason": "within 1 point"}
    manifest = dataclasses.replace(bundle.manifest, version="v1-int8", files=file_entries(files),
                                   serving_file=INT8_FILE, variants=variants)  # fmt: skip
    return Bundle(files, manifest)


def test_the_int8_variant_the_manifest_names_is_served(tmp_path: Path, bundles: Bundles) -> None:
    service = new_service(tmp_path, _int8_only(bundles.v1))
    service.start()
    try:
        assert service.wait_idle(30)
        answer = service.predict(bundles.pixels[:8])
        assert answer.version == "v1-int8"
        serving = service.describe()["serving"]
        assert (serving["file"], serving["variant"]) == (INT8_FILE, "int8")
        assert serving["variants"]["reason"] == "within 1 point"
    finally:
        service.stop()


def test_without_a_variant_model_onnx_is_served(tmp_path: Path, bundles: Bundles) -> None:
    service = new_service(tmp_path, bundles.v1)
    service.start()
    try:
        assert service.wait_idle(30)
        serving = service.describe()["serving"]
        assert (serving["file"], serving["variant"]) == (MODEL_FILE, "fp32")
    finally:
        service.stop()
