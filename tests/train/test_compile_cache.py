"""Where the trainer points torch's compile caches (bioscale.train.compile_cache); the GPU test
``test_train_gpu.py::test_a_second_run_of_a_recipe_compiles_nothing_new`` shows a second run reusing them."""

from __future__ import annotations

import pytest

from bioscale.train.compile_cache import ENV_VAR, compile_counters, default_compile_cache_dir, use_compile_cache


def test_the_user_cache_is_the_default_and_an_explicit_directory_wins(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("BIOSCALE_CACHE", str(tmp_path / "user"))
    assert default_compile_cache_dir() == tmp_path / "user" / "inductor"
    assert use_compile_cache() == tmp_path / "user" / "inductor"
    assert (tmp_path / "user" / "inductor").is_dir()
    import os

    assert os.environ[ENV_VAR] == str(tmp_path / "user" / "inductor")
    assert use_compile_cache(tmp_path / "recipe") == tmp_path / "recipe"
    assert os.environ[ENV_VAR] == str(tmp_path / "recipe")


def test_a_cache_directory_set_in_the_environment_is_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "mine"))
    monkeypatch.setenv("BIOSCALE_CACHE", str(tmp_path / "user"))
    assert use_compile_cache() == tmp_path / "mine"
    assert not (tmp_path / "user").exists()


def test_an_unwritable_cache_directory_leaves_torchs_default_with_a_warning(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level("WARNING"):
        assert use_compile_cache(blocker / "inductor") is None
    assert "cannot be created" in caplog.text
    import os

    assert ENV_VAR not in os.environ


def test_compile_counters_count_a_compiled_graph() -> None:
    torch = pytest.importorskip("torch")
    before = compile_counters()

    @torch.compile(backend="eager")
    def double(x):
        return x * 2

    double(torch.ones(3))
    after = compile_counters()
    assert after["graphs_compiled"] == before["graphs_compiled"] + 1
    assert set(after) == {"graphs_compiled", "fx_graph_cache_hit", "fx_graph_cache_miss", "aot_autograd_cache_hit",
                          "aot_autograd_cache_miss"}  # fmt: skip
