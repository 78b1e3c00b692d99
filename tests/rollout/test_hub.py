"""Hugging Face Hub ids: ``rollout.resolve_model`` finds a snapshot in a Hub cache this test lays
out itself (huggingface_hub's layout: ``models--org--name/{blobs,refs,snapshots}``), offline;
``rollout.LLM`` and the trainer's ``model:`` take the id; a missing id says what was looked for
where. Nothing here touches the network (``local_files_only`` or ``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rollout import resolve_model
from rollout.testing import make_tiny_moe

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def lay_out_cache(
    cache: Path, repo_id: str, checkpoint: Path, commit: str, refs: list[str]
) -> Path:
    """Put ``checkpoint``'s files into ``cache`` as huggingface_hub stores a download: content in
    ``blobs/<sha256>``, ``snapshots/<commit>/<file>`` symlinks to them, ``refs/<ref>`` holding
    the commit. Returns the snapshot folder."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(checkpoint.iterdir()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Hub cache with ``tiny/qwen3-moe`` at ``main`` (and tag ``v2``) and an older commit
    tagged ``v1`` whose config differs, as ``$HF_HOME/hub`` of a fresh HF_HOME."""
    root = tmp_path_factory.mktemp("hub")
    checkpoint = make_tiny_moe("qwen3_moe", root / "checkpoint", seed=0)
    cache = root / "hf_home" / "hub"
    main = lay_out_cache(cache, "tiny/qwen3-moe", checkpoint, COMMIT, ["main", "v2"])
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "old_revision": True}))
    old = lay_out_cache(cache, "tiny/qwen3-moe", checkpoint, OLD_COMMIT, ["v1"])
    return {"cache": cache, "hf_home": root / "hf_home", "main": main, "old": old}


def test_hub_id_resolves_to_its_cached_snapshot(hub_cache: dict[str, Path]) -> None:
    cache = hub_cache["cache"]
    found = resolve_model("tiny/qwen3-moe", cache_dir=cache, local_files_only=True)
    assert found == hub_cache["main"]
    assert (found / "config.json").is_file() and (found / "tokenizer.json").is_file()
    tag = resolve_model("tiny/qwen3-moe", revision="v2", cache_dir=cache, local_files_only=True)
    assert tag == hub_cache["main"]
    for revision in ("v1", OLD_COMMIT):
        old = resolve_model(
            "tiny/qwen3-moe", revision=revision, cache_dir=cache, local_files_only=True
        )
        assert old == hub_cache["old"]
        assert json.loads((old / "config.json").read_text())["old_revision"] is True


def test_missing_id_or_revision_offline_says_what_was_looked_for_where(
    hub_cache: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no folder named like the id here
    cache = hub_cache["cache"]
    with pytest.raises(ValueError) as info:
        resolve_model("tiny/missing-moe", cache_dir=cache, local_files_only=True)
    message = str(info.value)
    assert message.startswith("model: expected a checkpoint folder or a Hugging Face Hub id")
    assert "'tiny/missing-moe' at revision 'main'" in message
    assert str(cache / "models--tiny--missing-moe") in message
    assert str(tmp_path / "tiny" / "missing-moe") in message  # the folder it is not
    assert "nothing was downloaded" in message
    with pytest.raises(ValueError, match=r"at revision 'v9' in the Hub cache"):
        resolve_model("tiny/qwen3-moe", revision="v9", cache_dir=cache, local_files_only=True)


def test_local_folders_and_bad_arguments(
    hub_cache: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(hub_cache["main"].parent)
    # An existing path wins over an id of the same spelling, and comes back absolute.
    assert resolve_model(COMMIT) == hub_cache["main"]
    assert resolve_model(Path(COMMIT)) == hub_cache["main"]
    with pytest.raises(ValueError, match=r"revision: expected None for the local folder .* 'v1'"):
        resolve_model(COMMIT, revision="v1")
    # A path-like is always a folder; a str that cannot be an id is one too.
    with pytest.raises(ValueError, match=r"got 'tiny/qwen3-moe': no such folder"):
        resolve_model(Path("tiny/qwen3-moe"))
    with pytest.raises(ValueError, match=r"got '\./nothing/here': no such folder"):
        resolve_model("./nothing/here")
    with pytest.raises(TypeError, match="model: expected a folder or a Hub id"):
        resolve_model(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="revision: expected None or a str, got int"):
        resolve_model("tiny/qwen3-moe", revision=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="revision: expected None or a branch"):
        resolve_model("tiny/qwen3-moe", revision="")


def test_trainer_config_refuses_a_revision_of_a_local_folder(hub_cache: dict[str, Path]) -> None:
    from replay.trainer.config import load_config

    folder = hub_cache["main"]
    with pytest.raises(ValueError, match=r"^model_revision: expected null for the local folder"):
        load_config(None, [f"model={folder}", "model_revision=v1"])
    assert load_config(None, [f"model={folder}"]).model_revision is None


SCRIPT = textwrap.dedent(
    """
    import json, sys
    from rollout import LLM, SamplingParams
    from replay.trainer.config import load_config
    from replay.trainer.loop import prepare_model

    with LLM("tiny/qwen3-moe", device="cpu", kv_cache_blocks=16) as llm:
        out = llm.generate(["a b"], SamplingParams(max_tokens=3, seed=0), use_tqdm=False)[0]
        folder = llm.config.model
    with LLM("tiny/qwen3-moe", revision="v1", device="cpu", kv_cache_blocks=16) as llm:
        old = llm.config.model
    # The trainer: load_config checks the snapshot before Ray starts, then the run resolves it.
    trainer = prepare_model(load_config(None, ["model=tiny/qwen3-moe", "model_revision=v1"]))
    errors = []
    for make in (lambda: LLM("tiny/absent-moe"),
                 lambda: load_config(None, ["model=tiny/absent-moe"])):
        try:
            make()
            errors.append(None)
        except ValueError as err:
            errors.append(str(err))
    print(json.dumps({"tokens": len(out.token_ids), "folder": folder, "old": old,
                      "trainer": str(trainer), "errors": errors}))
    """
)


@pytest.mark.slow
def test_llm_and_trainer_take_hub_ids_from_hf_home_offline(
    hub_cache: dict[str, Path], tmp_path: Path
) -> None:
    """A fresh process with HF_HOME and HF_HUB_OFFLINE=1, as a user on an offline node sets."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("HF_") and key != "TRANSFORMERS_CACHE"
    }
    env.update(
        HF_HOME=str(hub_cache["hf_home"]),
        HF_HUB_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=240, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["tokens"] == 3
    assert summary["folder"] == str(hub_cache["main"])
    assert summary["old"] == summary["trainer"] == str(hub_cache["old"])
    for error in summary["errors"]:  # rollout.LLM's, then the trainer config's
        assert error.startswith("model: expected a checkpoint folder or a Hugging Face Hub id")
        assert str(hub_cache["cache"] / "models--tiny--absent-moe") in error
        assert "HF_HUB_OFFLINE" in error
