"""The model store: atomic installs, variants, names, removal."""

import json

import pytest

from ortllm.errors import InvalidModelName, ModelNotFound
from ortllm.store import ModelStore, validate_name


def fake_variant(folder, marker="x"):
    (folder / "genai_config.json").write_text(json.dumps({"model": {"context_length": 64}}))
    (folder / "model.onnx").write_text(marker)


@pytest.fixture
def store(tmp_path):
    return ModelStore(tmp_path)


def test_install_commits_only_on_success(store):
    with pytest.raises(RuntimeError):
        with store.install("m", "cpu-int4", {"source": "s"}) as out:
            fake_variant(out)
            raise RuntimeError("crash mid-build")
    assert store.list() == []
    assert [p.name for p in store.root.iterdir()] == []  # no staging left behind


def test_installed_model_has_manifest_and_sizes(store):
    manifest = {"source": "s", "kind": "chat"}
    with store.install("m", "cpu-int4", manifest) as out:
        fake_variant(out, "12345")
        manifest["variants"] = {"cpu-int4": {"precision": "int4", "ep": "cpu"}}
    model = store.get("m")
    assert model.get("source") == "s" and model.get("created")
    variant = model.variants["cpu-int4"]
    assert variant.precision == "int4" and variant.size_bytes > 0


def test_second_variant_is_added_beside_the_first(store):
    for vid in ("cpu-int4", "dml-int4"):
        manifest = {"source": "s"}
        with store.install("m", vid, manifest) as out:
            fake_variant(out)
            manifest["variants"] = {vid: {"ep": vid.split("-")[0]}}
    assert sorted(store.get("m").variants) == ["cpu-int4", "dml-int4"]
    store.remove("m", "dml-int4")
    assert sorted(store.get("m").variants) == ["cpu-int4"]
    store.remove("m")
    with pytest.raises(ModelNotFound, match="Model 'm' not found"):
        store.get("m")


def test_stale_staging_of_a_dead_process_is_cleaned(store):
    stale = store.root / ".staging-m-cpu-int4-999999999-abcd1234"
    (stale / "cpu-int4").mkdir(parents=True)
    assert store.list() == []
    store.clean_stale()
    assert not stale.exists()


@pytest.mark.parametrize("name", ["../../etc", "a/b", "", ".hidden", "x" * 200, "a..b", "white space"])
def test_bad_names_are_refused(name):
    with pytest.raises(InvalidModelName):
        validate_name(name)


def test_lookup_of_a_traversal_name_is_not_found(store):
    assert store.find("../../etc") is None
