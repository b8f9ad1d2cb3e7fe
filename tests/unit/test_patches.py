"""The upstreaming patches (``patches/*.patch``) against vLLM 0.26.0's sources.

The vLLM 0.26.0 CUDA wheel holds its Python sources. It is taken from
``VLLM_DFLASH_VLLM026_WHEEL``, else from ``~/.cache/vllm-dflash/``, else
fetched there with ``pip download`` (about 300 MB, once). No GPU is needed:
the patches are applied to the extracted files and vLLM 0.26's config code
runs on CPU.
"""

from __future__ import annotations

import json
import os
import py_compile
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from vllm_dflash import config, patching, tiny

ROOT = Path(__file__).resolve().parents[2]
PATCH_DIR = ROOT / "patches"
PATCHES = sorted(PATCH_DIR.glob("*.patch"))
CACHE = Path.home() / ".cache" / "vllm-dflash"
WHEEL_GLOB = "vllm-0.26.0-*.whl"


def vllm_026_wheel() -> Path:
    given = os.environ.get("VLLM_DFLASH_VLLM026_WHEEL")
    if given:
        return Path(given)
    found = sorted(CACHE.glob(WHEEL_GLOB))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "vllm==0.26.0"]
        cmd += ["--no-deps", "--only-binary", ":all:", "-d", str(CACHE)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, (
            "could not fetch the vLLM 0.26.0 wheel (set VLLM_DFLASH_VLLM026_WHEEL "
            "to a local copy): " + proc.stderr[-2000:]
        )
        found = sorted(CACHE.glob(WHEEL_GLOB))
    assert found, f"no {WHEEL_GLOB} in {CACHE}"
    return found[0]


def touched_files(patch: Path) -> tuple[set[str], set[str]]:
    """(files the patch changes, files it creates), as vLLM paths."""
    text = patch.read_text()
    changed = set(re.findall(r"^diff --git a/(\S+) b/", text, flags=re.M))
    created = set(re.findall(r"^--- /dev/null\n\+\+\+ b/(\S+)$", text, flags=re.M))
    return changed - created, created


def git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t")
    env |= dict(GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def wheel() -> zipfile.ZipFile:
    return zipfile.ZipFile(vllm_026_wheel())


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, wheel: zipfile.ZipFile) -> Path:
    """A git repository holding, committed, the 0.26.0 files the patches touch."""
    repo = tmp_path_factory.mktemp("vllm-026")
    needed = set().union(*(touched_files(p)[0] for p in PATCHES))
    for name in sorted(needed):
        wheel.extract(name, repo)
    assert git(repo, "init", "-q").returncode == 0
    git(repo, "add", "-A")
    assert git(repo, "commit", "-qm", "vLLM 0.26.0").returncode == 0
    return repo


def test_there_are_three_focused_patches() -> None:
    assert [p.name[:4] for p in PATCHES] == ["0001", "0002", "0003"]
    for patch in PATCHES:
        text = patch.read_text()
        assert text.startswith("From "), f"{patch.name} is not git format-patch output"
        changed, created = touched_files(patch)
        assert changed | created, patch.name
        assert all(f.startswith("vllm/") for f in changed | created)
        # A description of what and why, not only a subject line.
        message = text.split("\n---\n", 1)[0]
        assert len(message.splitlines()) > 10, f"{patch.name}: describe what and why"


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name[:4])
def test_each_patch_applies_alone_to_vllm_026(baseline: Path, patch: Path) -> None:
    proc = git(baseline, "apply", "--check", str(patch))
    assert proc.returncode == 0, proc.stderr


def test_patches_apply_in_order_and_compile(baseline: Path, tmp_path: Path) -> None:
    repo = tmp_path / "applied"
    assert git(tmp_path, "clone", "-q", str(baseline), str(repo)).returncode == 0
    for patch in PATCHES:
        proc = git(repo, "am", "-q", str(patch))
        assert proc.returncode == 0, f"{patch.name}: {proc.stderr}"
    touched = set().union(*(set().union(*touched_files(p)) for p in PATCHES))
    for name in sorted(touched):
        py_compile.compile(str(repo / name), doraise=True)
    log = git(repo, "log", "--format=%s").stdout.splitlines()
    assert len(log) == len(PATCHES) + 1


def test_readme_maps_each_patch_to_plugin_code() -> None:
    readme = (PATCH_DIR / "README.md").read_text()
    for patch in PATCHES:
        assert f"`{patch.name}`" in readme, f"{patch.name} missing from README"
    # Every ledger entry the README says a patch replaces exists in the plugin.
    for name in re.findall(r"`patching\.(patch_\w+)`", readme):
        assert hasattr(patching, name), f"README names patching.{name}"
    for name in re.findall(r"`config\.(\w+)", readme):
        assert hasattr(config, name), f"README names config.{name}"
    for entry in ("patch_v1_runner_proposer", "patch_v2_speculator"):
        assert entry in readme


PATCHED_CONFIG_SCRIPT = textwrap.dedent(
    """
    import copy, json, shutil, sys
    from pathlib import Path

    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms._current_platform = CpuPlatform()  # a CUDA wheel on a CPU box
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.spec_decode import registry
    from vllm.v1.worker.gpu.spec_decode import init_speculator

    target, draft, work = map(Path, sys.argv[1:4])
    base = json.loads((draft / "config.json").read_text())

    def drafter(name, top=(), dflash=()):
        d = work / name
        shutil.copytree(draft, d)
        cfg = copy.deepcopy(base)
        cfg.update(dict(top))
        cfg["dflash_config"].update(dict(dflash))
        (d / "config.json").write_text(json.dumps(cfg))
        return str(d)

    def build(path, k=7, **kw):
        spec = {"method": "dflash", "model": path, "num_speculative_tokens": k}
        args = EngineArgs(model=str(target), skip_tokenizer_init=True,
                          max_model_len=256, speculative_config=spec, **kw)
        return args.create_engine_config()

    out = {}
    cases = {
        "good": (drafter("good"), {}),
        "k": (drafter("k"), {"k": 8}),
        "layer": (drafter("layer", dflash={"target_layer_ids": [0, 4]}), {}),
        "dup": (drafter("dup", dflash={"target_layer_ids": [2, 2]}), {}),
        "mask": (drafter("mask", dflash={"mask_token_id": 512}), {}),
        "width": (drafter("width", top={"target_hidden_size": 256}), {}),
        "budget": (drafter("budget"),
                   {"max_num_seqs": 64, "max_num_batched_tokens": 500}),
        "budget_ok": (drafter("budget_ok"),
                      {"max_num_seqs": 64, "max_num_batched_tokens": 512}),
    }
    configs = {}
    for name, (path, kw) in cases.items():
        try:
            configs[name] = build(path, **kw)
            out[name] = "OK"
        except Exception as e:
            out[name] = str(e)

    class PluginSpeculator:
        def __init__(self, vllm_config, device):
            self.method = vllm_config.speculative_config.method

    registry.register_speculator("dflash", "__main__:PluginSpeculator")
    built = init_speculator(configs["good"], "cpu")
    out["speculator"] = type(built).__name__ + ":" + built.method
    registry.register_proposer("eagle3", "__main__:PluginSpeculator")
    out["v1_only"] = [registry.requires_v1_model_runner(m) for m in
                      ("dflash", "eagle3", "mtp")]
    print("RESULT " + json.dumps(out))
    """
)


def test_patched_vllm_026_config_refuses_bad_drafters(
    wheel: zipfile.ZipFile, tmp_path: Path
) -> None:
    """vLLM 0.26's own config code with the patches, on CPU: patch 0003's
    checks refuse each misconfiguration with its message, and patch 0001's
    registry makes ``init_speculator`` build a plugin's class."""
    tree = tmp_path / "vllm-026"
    wheel.extractall(tree, [n for n in wheel.namelist() if n.endswith(".py")])
    for patch in PATCHES:
        proc = subprocess.run(
            ["git", "apply", str(patch)], cwd=tree, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
    target = tiny.build_target(tmp_path / "target")
    draft = tiny.build_drafter(
        tmp_path / "draft",
        target,
        tiny.TinyDrafter(num_hidden_layers=2, block_size=8, target_layer_ids=[0, 2]),
    )
    (tmp_path / "work").mkdir()
    script = tmp_path / "check.py"
    script.write_text(PATCHED_CONFIG_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(tree), VLLM_PLUGINS="")
    proc = subprocess.run(
        [sys.executable, str(script), str(target), str(draft), str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["good"] == "OK" and out["budget_ok"] == "OK"
    assert "num_speculative_tokens=8 is too large" in out["k"]
    assert "Set num_speculative_tokens to 7 or less" in out["k"]
    assert "names layers [4]" in out["layer"] and "ids 0..3" in out["layer"]
    assert "target_layer_ids=[2, 2]" in out["dup"] and "repeats" in out["dup"]
    assert "mask_token_id=512" in out["mask"] and "vocabulary size 512" in out["mask"]
    assert "width 256" in out["width"] and "hidden_size=128" in out["width"]
    assert "max_num_batched_tokens=500 is too small" in out["budget"]
    assert "at least 512" in out["budget"] and "at most 62" in out["budget"]
    assert out["speculator"] == "PluginSpeculator:dflash"
    assert out["v1_only"] == [False, True, False]
