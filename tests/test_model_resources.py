"""Model-role resources: one per role, wired from the config, lazy, loaded once per process, freed at teardown."""
import subprocess
import sys

import dagster as dg
import pytest

from music_dagster.config import ROLES
from music_dagster.resources.models import RESOURCE_CLASSES, DinoResource, MusicVisionResource, model_resources
from music_dagster.zoo import loaders
from music_dagster.zoo.loaders import LoaderError


@pytest.fixture
def count_loads(monkeypatch):
    calls = []
    real = loaders.load_role

    def counting(role, spec, device, dtype):
        calls.append(role)
        return real(role, spec, device, dtype)

    monkeypatch.setattr(loaders, "load_role", counting)
    return calls


def _dino(tiny_zoo, **kw):
    return DinoResource(checkpoint=str(tiny_zoo["dino"]), device="cpu", **kw)


def test_one_resource_per_role_from_config(make_project):
    config = make_project().get()
    resources = model_resources(config)
    assert list(resources) == list(ROLES)
    for role, res in resources.items():
        assert type(res) is RESOURCE_CLASSES[role] and res.role == role
        spec = config.models[role]
        assert (res.checkpoint, res.subfolder, res.revision) == (spec.id, spec.subfolder, spec.revision)
        assert res.trust_remote_code is False
        assert (res.device, res.dtype, res.torch_threads) == (
            config.profile.device, config.profile.dtype, config.profile.torch_threads)


def test_importing_resources_does_not_import_torch():
    code = ("import sys; from music_dagster.config import load_config; "
            "from music_dagster.resources.models import model_resources; model_resources(load_config()); "
            "print(sorted(x for x in ('torch', 'transformers', 'diffusers', 'open_clip') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_loads_lazily_and_once_per_process(tiny_zoo, count_loads):
    res = _dino(tiny_zoo)
    res.unload()
    assert not res.is_loaded and count_loads == []
    handle = res.load()
    assert res.load() is handle and _dino(tiny_zoo).load() is handle  # same spec, same process: one load
    assert count_loads == ["dino"]
    assert type(handle.model).__name__ == "VisionTransformer" and not handle.model.training
    assert str(handle.device) == "cpu"
    res.unload()


def test_teardown_frees_and_next_load_reloads(tiny_zoo, count_loads):
    res = _dino(tiny_zoo)
    first = res.load()
    res.teardown_after_execution(dg.build_init_resource_context())
    assert not res.is_loaded
    assert res.load() is not first and count_loads == ["dino", "dino"]
    res.unload()


def test_the_last_unload_collects_what_every_model_held(tiny_zoo):
    """A run's teardown unloads its models in a row: one full collection when the last goes (with automatic
    collection off here, only that one can free the models' reference cycles)."""
    import gc
    import weakref

    dino = _dino(tiny_zoo)
    vision = MusicVisionResource(checkpoint=str(tiny_zoo["music_vision"]), device="cpu")
    models = [weakref.ref(dino.load().model), weakref.ref(vision.load().model)]
    gc.disable()
    try:
        dino.unload()
        vision.unload()
        assert [ref() for ref in models] == [None, None]
    finally:
        gc.enable()


def test_cache_key_separates_roles_and_dtypes(tiny_zoo, count_loads):
    a = _dino(tiny_zoo)
    b = _dino(tiny_zoo, dtype="bfloat16")  # on CPU it stays float32, but it is another configuration
    assert a.load() is not b.load() and count_loads == ["dino", "dino"]
    a.unload()
    assert b.is_loaded and not a.is_loaded
    b.unload()


def test_dagster_step_loads_and_tears_down(tiny_zoo, count_loads):
    @dg.asset
    def patch_tokens(music_vision: MusicVisionResource) -> int:
        import numpy as np
        import torch
        from PIL import Image

        h = music_vision.load()
        assert music_vision.load() is h
        inputs = h.processor(images=[Image.fromarray(np.zeros((64, 64, 3), np.uint8))], return_tensors="pt")
        with torch.no_grad():
            return h.model(**inputs).last_hidden_state.shape[1]

    res = MusicVisionResource(checkpoint=str(tiny_zoo["music_vision"]), device="cpu")
    result = dg.materialize([patch_tokens], resources={"music_vision": res})
    assert result.success and result.output_for_node("patch_tokens") == 64
    assert count_loads == ["music_vision"]
    assert not res.is_loaded  # freed when the step ended


def test_bad_checkpoint_is_one_line_error(tmp_path):
    res = DinoResource(checkpoint=str(tmp_path / "missing"), device="cpu")
    with pytest.raises(LoaderError, match="missing") as e:
        res.load()
    assert "\n" not in str(e.value) and not res.is_loaded



def test_a_step_loads_on_its_leased_device_and_teardown_frees_it(tiny_zoo, count_loads, tmp_path):
    from music_dagster.zoo import devices
    res = DinoResource(checkpoint=str(tiny_zoo["dino"]), device="auto")
    with devices.lease(tmp_path, ["cpu"], wait_s=1):
        handle = res.load()
        assert str(handle.device) == "cpu" and res.is_loaded
        assert res.load() is handle and count_loads == ["dino"]
    res.unload()  # teardown runs outside the step's lease: it still frees what the step loaded
    with devices.lease(tmp_path, ["cpu"], wait_s=1):
        assert not res.is_loaded


def test_load_fresh_is_a_copy_of_its_own_never_cached(tiny_zoo, count_loads):
    """What MUSIC's backbones load with (peft changes the LLM in place): a new handle per call, outside the cache."""
    res = MusicVisionResource(checkpoint=str(tiny_zoo["music_vision"]), device="cpu")
    res.unload()
    first, second = res.load_fresh(), res.load_fresh()
    assert first is not second and first.model is not second.model
    assert not res.is_loaded and count_loads == ["music_vision", "music_vision"]


def test_outside_dagster_a_role_loads_through_its_resource_built_from_the_config(make_project, tiny_zoo):
    from music_dagster.model import runtime
    config = make_project().get()
    built = runtime.model_resource(config, "clip")
    assert type(built) is RESOURCE_CLASSES["clip"] and built == RESOURCE_CLASSES["clip"].from_config(config)
    given = MusicVisionResource(checkpoint=str(tiny_zoo["music_vision"]), device="cpu")
    assert runtime.model_resource(config, "music_vision", {"music_vision": given}) is given
    swapped = runtime.with_models(config, {"music_vision": given})
    assert swapped.models["music_vision"].id == str(tiny_zoo["music_vision"])
    assert swapped.models["music_llm"] == config.models["music_llm"]
