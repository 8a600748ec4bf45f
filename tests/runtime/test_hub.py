"""Hub models: a snapshot laid out as huggingface_hub's cache resolves offline through the same
`snapshot_download` call a download makes; its commit is in the manifests and in `status`; a
moved `refs/main` reruns the stages that read it; a model that cannot be had is a clear error."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import transformers as tf

import surgery_util as su
from cascadec import hub
from cascadec import workspace as ws
from cascadec.runtime import executor, registry

SPEC = """\
cascadec: 1
family: hubby
description: A parent named by a hub id.
hardware: {device: cpu, peak_tflops: {assumed: 0.2, why: "cpu"}, mfu: {assumed: 0.05, why: "cpu"}}
defaults:
  resources: {devices: 1, launcher: local, precision: fp32}
  optimizer: {lr: 1.0e-3, min_lr: 1.0e-4, weight_decay: 0.0}
  schedule: {kind: cosine, warmup_steps: 1}
  batch: {global: 4, micro: 4}
  checkpoint: {every_steps: 100, keep: 1}
  calibration: {data: corpus, samples: 4, seq_len: 32, batch_size: 4}
  seed: 0
models:
  parent:
    source: {hub: org/tiny}
    arch: {family: mistral, layers: 4, hidden: 64, ffn: 128, heads: 4, kv_heads: 2, head_dim: 16, vocab: 320}
data:
  corpus: {kind: text, paths: ["corpus.txt"]}
children:
  - name: kid
    prune_from: parent
    shape: {ffn: 64}
    pruning: {ffn: activation}
    phases:
      - {name: short, teacher: parent, data: corpus, tokens: 512, seq_len: 32}
"""


def commit(tag: str) -> str:
    return hashlib.sha1(tag.encode()).hexdigest()


def publish(cache: Path, repo: str, model_dir: Path, sha: str, ref: str | None = "main") -> Path:
    """Lay ``model_dir`` out as huggingface_hub's cache does: `blobs/<hash>`, the snapshot's files
    as relative symlinks to them, and `refs/<ref>` holding the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for f in sorted(model_dir.iterdir()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / sha / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / ref).write_text(sha)
    return root / "snapshots" / sha


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """huggingface_hub in offline mode on an empty cache under tmp_path (in this process; it reads
    its environment once, at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


# -- the whole path, as a user runs it ------------------------------------------------------------

def _cli(*args, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cwd / "hf-home"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cascadec", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_hub_model_runs_offline_from_the_cache_and_a_moved_ref_reruns(tmp_path):
    cache, one, two = tmp_path / "hf-cache", commit("one"), commit("two")
    snap = publish(cache, "org/tiny", su.model(tmp_path / "v1", "mistral", bf16=True), one)
    (tmp_path / "spec.yaml").write_text(SPEC)
    (tmp_path / "corpus.txt").write_text(su.tinymodels.TEXT * 8)

    run = _cli("run", "spec.yaml", "--workdir", "ws", cwd=tmp_path, cache=cache)
    assert run.returncode == 0, run.stdout + run.stderr
    work = tmp_path / "ws"
    recorded = {"parent": {"hub": "org/tiny", "revision": "main", "commit": one}}
    for sid in ("calibrate/kid", "prune/kid", "tokenize/corpus/parent", "distill/kid/short"):
        assert ws.read_manifest(work, sid)["hub_revisions"] == recorded, sid
    assert ws.read_manifest(work, "export/kid")["hub_revisions"] == {}  # it reads stage outputs only
    pruned = tf.AutoModelForCausalLM.from_pretrained(work / "stages/prune/kid/model")
    parent = tf.AutoModelForCausalLM.from_pretrained(snap)
    assert pruned.config.intermediate_size == 64 and parent.config.intermediate_size == 128
    # the prune read the snapshot's weights: the untouched tensors are the parent's
    assert pruned.model.embed_tokens.weight.float().equal(parent.model.embed_tokens.weight.float())
    assert json.loads((work / "stages/calibrate/kid/summary.json").read_text())["tokens"] == 4 * 32

    status = _cli("status", "spec.yaml", "--workdir", "ws", cwd=tmp_path, cache=cache)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"hub   model 'parent' (org/tiny@main) = {one} (local cache)"
    assert lines[-1] == "0 to run, 5 up to date."

    # the branch moves on: refs/main names another commit, with other weights
    publish(cache, "org/tiny", su.model(tmp_path / "v2", "mistral", bf16=True, norms=False), two)
    status = _cli("status", "spec.yaml", "--workdir", "ws", cwd=tmp_path, cache=cache)
    moved = f"(input changed: model 'parent' (org/tiny@main) moved from {one[:12]} to {two[:12]})"
    assert status.stdout.splitlines() == [
        f"hub   model 'parent' (org/tiny@main) = {two} (local cache)",
        f"run   calibrate/kid           {moved}",
        "run   prune/kid               (input changed: calibrate/kid reruns)",
        f"run   tokenize/corpus/parent  {moved}",  # the parent's tokenizer files are the snapshot's
        "run   distill/kid/short       (input changed: prune/kid, tokenize/corpus/parent reruns)",
        "run   export/kid              (input changed: distill/kid/short reruns)",
        "5 to run, 0 up to date.",
    ]
    dry = _cli("run", "spec.yaml", "--workdir", "ws", "--dry-run", cwd=tmp_path, cache=cache)
    assert dry.returncode == 2 and dry.stdout.splitlines()[0] == status.stdout.splitlines()[1]
    again = _cli("run", "spec.yaml", "--workdir", "ws", "--only", "calibrate/kid", cwd=tmp_path, cache=cache)
    assert again.returncode == 0, again.stdout + again.stderr
    assert ws.read_manifest(work, "calibrate/kid")["hub_revisions"]["parent"]["commit"] == two


# -- resolution and its errors, in process ----------------------------------------------------------

def _hub_plan(source: dict) -> dict:
    """A one-stage plan whose stage reads hub model `parent` (the executor test's fake kind)."""
    st = {"id": "s", "kind": "read", "needs": [], "inputs": [{"role": "model", "model": "parent"}],
          "outputs": ["stages/s/out"], "config": {}, "launch": {"devices": 1, "launcher": "local"}, "hash": "h"}
    return {"spec_sha256": "0" * 64, "models": {"parent": {"source": source}}, "data": {}, "stages": [st]}


@pytest.fixture
def reader(monkeypatch):
    """Registers kind `read`: records the model folder it is given and copies its config.json."""
    seen = []

    def read(ctx):
        seen.append(ctx.inputs["model"])
        (ctx.out / "out").write_text((ctx.inputs["model"] / "config.json").read_text())

    monkeypatch.setitem(registry.STAGES, "read", read)
    return seen


def test_an_uncached_model_offline_is_a_clear_error(offline, reader, tmp_path):
    lines = []
    rc = executor.run_plan(_hub_plan({"hub": "org/missing"}), tmp_path / "ws", tmp_path, out=lines.append)
    assert rc == 1 and reader == []
    assert lines[-1] == (
        f"error: stage s: model 'parent' (org/missing@main): revision 'main' is not in the local Hugging Face "
        f"cache ({offline}) and HF_HUB_OFFLINE=1 forbids asking the hub; run it once where the hub is reachable "
        f"(HF_HUB_OFFLINE unset), or fetch it with `hf download org/missing --revision main`"
    )
    pinned = commit("pinned")
    rc = executor.run_plan(_hub_plan({"hub": "org/missing", "revision": pinned}), tmp_path / "ws", tmp_path,
                           out=lines.append)
    assert rc == 1 and lines[-1] == (
        f"error: stage s: model 'parent' (org/missing@{pinned}): org/missing at {pinned[:12]} (revision {pinned}) "
        f"is not in the local Hugging Face cache ({offline}) and HF_HUB_OFFLINE=1 forbids downloading it; run it "
        f"once where the hub is reachable (HF_HUB_OFFLINE unset), or fetch it with "
        f"`hf download org/missing --revision {pinned}`"
    )
    assert not (tmp_path / "ws" / "stages" / "s").exists()


def test_stages_get_the_snapshot_folder_and_a_pinned_commit_needs_no_ref(offline, reader, tmp_path):
    sha = commit("tagged")
    snap = publish(offline, "org/tiny", su.model(tmp_path / "m", "mistral"), sha, ref="v1.0")
    for source in ({"hub": "org/tiny", "revision": "v1.0"}, {"hub": "org/tiny", "revision": sha}):
        plan = _hub_plan(source)
        assert executor.run_plan(plan, tmp_path / source["revision"], tmp_path, out=lambda line: None) == 0
        assert reader[-1] == snap
        assert ws.read_manifest(tmp_path / source["revision"], "s")["hub_revisions"] == {
            "parent": {"hub": "org/tiny", "revision": source["revision"], "commit": sha}}
    # status with the ref gone: the tag is not checked (the stage stays up to date), the pin needs nothing
    (offline / "models--org--tiny" / "refs" / "v1.0").unlink()
    for rev, line in (("v1.0", "= not checked (not in the local Hugging Face cache)"), (sha, f"= {sha} (pinned)")):
        out = ws.status_lines(_hub_plan({"hub": "org/tiny", "revision": rev}), tmp_path / rev)
        assert out == [f"hub   model 'parent' (org/tiny@{rev}) {line}", "skip  s  (up to date)", "0 to run, 1 up to date."]


def test_a_snapshot_without_a_tokenizer_is_refused(offline, reader, tmp_path):
    model = su.model(tmp_path / "m", "mistral")
    for name in hub.TOKENIZER_FILES:
        (model / name).unlink(missing_ok=True)
    snap = publish(offline, "org/notok", model, commit("notok"))
    lines = []
    assert executor.run_plan(_hub_plan({"hub": "org/notok"}), tmp_path / "ws", tmp_path, out=lines.append) == 1
    assert lines[-1] == (f"error: stage s: model 'parent' (org/notok@main): the snapshot {snap} has no tokenizer "
                         "files; cascadec reads Hugging Face transformers checkpoints (safetensors) with their tokenizer")


def test_an_empty_tokenizer_fingerprint_is_an_error(tmp_path):
    from cascadec.runtime.data.stream import tokenizer_fingerprint

    with pytest.raises(ValueError, match=r"holds no tokenizer files \(tokenizer.json, "):
        tokenizer_fingerprint(tmp_path)


class _Hub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub does for a revision it does not have."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = b'{"error": "Invalid rev id: v9"}'
        self.send_response(404)
        self.send_header("X-Error-Code", "RevisionNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint(monkeypatch):
    """Point huggingface_hub (online) at a URL: ``endpoint(url)``."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return lambda url: monkeypatch.setattr(constants, "ENDPOINT", url)


def test_an_unknown_revision_and_an_unreachable_hub_are_clear_errors(offline, endpoint, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint(f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(hub.HubError) as e:
            hub.resolve(hub.HubModel("parent", "org/tiny", "v9"), local_only=False)
        assert not e.value.unreachable and str(e.value) == (
            "model 'parent' (org/tiny@v9): the hub has no revision 'v9' of org/tiny; set `revision` in the spec "
            "to a branch, tag or commit of org/tiny")
        port = server.server_port
    finally:
        server.shutdown()
        server.server_close()
    endpoint(f"http://127.0.0.1:{port}")  # nothing listens there now: connection refused
    with pytest.raises(hub.HubError) as e:
        hub.resolve(hub.HubModel("parent", "org/tiny", "main"), local_only=False)
    assert e.value.unreachable and str(e.value) == (
        f"model 'parent' (org/tiny@main): revision 'main' is not in the local Hugging Face cache ({offline}) and "
        "the hub cannot be reached; run it once where the hub is reachable (HF_HUB_OFFLINE unset), or fetch it "
        "with `hf download org/tiny --revision main`")


def test_cascadec_prune_takes_a_hub_id(offline, tmp_path, capsys):
    from cascadec.runtime.surgery.prune_cmd import main

    src = su.model(tmp_path / "m", "mistral", bf16=True)
    su.text_source(tmp_path, repeat=8)
    calib = ["--calibration", str(tmp_path / "calibration.txt"), "--samples", "4", "--seq-len", "32"]
    publish(offline, "org/tiny", src, commit("cli"), ref="v2")
    assert main(["org/tiny@v2", str(tmp_path / "out"), "--ffn", "64", *calib]) == 0, capsys.readouterr().err
    assert tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.intermediate_size == 64
    capsys.readouterr()
    assert main(["org/tiny", str(tmp_path / "out2"), "--ffn", "64", *calib]) == 1  # no refs/main in the cache
    assert capsys.readouterr().err == (
        f"error: model 'org/tiny' (org/tiny@main): revision 'main' is not in the local Hugging Face cache "
        f"({offline}) and HF_HUB_OFFLINE=1 forbids asking the hub; run it once where the hub is reachable "
        "(HF_HUB_OFFLINE unset), or fetch it with `hf download org/tiny --revision main`\n"
        "help: SRC is a model directory or a hub id ORG/NAME[@REVISION]\n")
    assert not (tmp_path / "out2").exists()
