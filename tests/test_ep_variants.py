"""EP-specific builds: cuda/dml/webgpu variants are built here; loading them where the EP is missing
fails with a message naming the package, and a model holding several variants picks one and says why."""

from __future__ import annotations

import json
import shutil

import pytest

from ortllm.errors import ModelLoadError
from ortllm.runtime.loaded import LoadedModel, choose_variant
from ortllm.store import ModelStore
from tests.conftest import DEFAULT_MODEL, ortllm
from tests.test_convert import cached_gguf


@pytest.fixture(scope="module")
def multi(pulled, home):
    """'smol-eps' with cpu-int4 (copied from the pulled model) plus dml-int4, webgpu-int4 and cuda-int4 builds."""
    target = home / "models" / "smol-eps"
    shutil.copytree(pulled, target)
    for ep in ("dml", "webgpu", "cuda"):
        ortllm("convert", str(cached_gguf()), "--name", "smol-eps", "--ep", ep, check=True)
    yield ModelStore().get("smol-eps")
    shutil.rmtree(target, ignore_errors=True)


@pytest.mark.parametrize("ep", ["dml", "webgpu", "cuda"])
def test_each_build_targets_its_provider(multi, ep):
    config = json.loads((multi.path / f"{ep}-int4" / "genai_config.json").read_text())
    providers = config["model"]["decoder"]["session_options"]["provider_options"]
    assert [next(iter(p)) for p in providers] == [ep]
    assert multi.manifest["variants"][f"{ep}-int4"]["ep"] == ep


def test_cpu_variant_is_chosen_and_the_reason_is_given(multi):
    model = LoadedModel(multi)
    assert model.variant.id == "cpu-int4" and model.ep == "cpu"
    assert "variants" in model.reason
    variant, reason = choose_variant(multi)
    assert variant.id in ("webgpu-int4", "cpu-int4") and reason  # doctor shows the first candidate and why


def test_forcing_a_missing_ep_names_the_package(multi):
    with pytest.raises(
        ModelLoadError, match="dml execution provider is not available.*onnxruntime-genai-directml"
    ):
        LoadedModel(multi, force_ep="dml")
    with pytest.raises(
        ModelLoadError, match="cuda execution provider is not available.*onnxruntime-genai-cuda"
    ):
        LoadedModel(multi, force_ep="cuda")


def test_a_model_built_only_for_a_missing_ep_fails_clearly(multi, home):
    only_dml = home / "models" / "smol-dml-only"
    shutil.copytree(multi.path, only_dml)
    try:
        for vid in ("cpu-int4", "webgpu-int4", "cuda-int4"):
            ModelStore().remove("smol-dml-only", vid)
        with pytest.raises(ModelLoadError) as info:
            LoadedModel(ModelStore().get("smol-dml-only"))
        message = str(info.value)
        assert "built for dml" in message and "onnxruntime-genai-directml" in message
        assert "ortllm convert" in message and "Traceback" not in message
        proc = ortllm("run", "smol-dml-only", "hi")
        assert proc.returncode == 1 and "onnxruntime-genai-directml" in proc.stderr
    finally:
        shutil.rmtree(only_dml, ignore_errors=True)


def test_no_variant_for_the_forced_ep(pulled):
    with pytest.raises(ModelLoadError, match=f"has no dml variant.*ortllm convert {DEFAULT_MODEL} --ep dml"):
        LoadedModel(ModelStore().get(DEFAULT_MODEL), force_ep="dml")


def test_api_models_and_doctor_show_variants(multi):
    from ortllm.web.app import create_app

    app = create_app()
    try:
        client = app.test_client()
        assert client.post("/api/models/smol-eps/load").status_code == 200
        body = client.get("/api/models/smol-eps").get_json()
        assert body["variants"] == ["cpu-int4", "cuda-int4", "dml-int4", "webgpu-int4"]
        assert body["ep"] == "cpu" and body["variant"] == "cpu-int4" and "variants" in body["ep_reason"]
    finally:
        app.extensions["ortllm"].registry.close()
    report = json.loads(ortllm("doctor", "--json", check=True).stdout)
    entry = next(m for m in report["models"] if m["name"] == "smol-eps")
    assert entry["variants"] == ["cpu-int4", "cuda-int4", "dml-int4", "webgpu-int4"] and entry["reason"]
