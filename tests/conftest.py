"""Shared fixtures: reference checkpoints made here with transformers' own GPT-2 / OpenAI-GPT classes."""

from __future__ import annotations

import os
import queue
import random
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch

# Tests never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: the models here are tiny, and two OpenMP threads on a busy 2-core machine spin-wait for each other
# (measured: GPT-1 reference's 40 training steps, 0.9 s on one thread, 14 s on two). Tests of the multi-threaded
# paths set their thread count themselves.
torch.set_num_threads(1)


def sharpen_attention(model: torch.nn.Module, factor: float = 6.0) -> None:
    """Scale the query and key projections so attention is peaked: random 0.02-std weights give nearly
    uniform attention, under which a wrong mask or position barely moves the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.c_attn.weight"):
                C = p.shape[0]  # Conv1D (in, out): the first 2*C output columns are q and k
                p[:, : 2 * C] *= factor
            elif name.endswith("attn.c_attn.bias"):
                p.normal_(0.0, 0.5)


def train_briefly(model: torch.nn.Module, vocab_size: int, steps: int = 40, seq: int = 24) -> None:
    """A few Adam steps on sequences that follow a fixed random permutation (next = perm[current]),
    so the model makes confident, varied predictions that depend on the context."""
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(vocab_size, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids = torch.empty(8, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab_size, (8,), generator=g)
        for t in range(1, seq):
            ids[:, t] = perm[ids[:, t - 1]]
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_gpt2(tmp_path_factory, train_steps: int = 40, **overrides):
    """A seeded transformers GPT-2 with peaked attention, trained `train_steps` steps (see `train_briefly`), saved."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    kwargs = dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=3, n_head=4, initializer_range=0.1)
    kwargs.update(overrides)
    kwargs.setdefault("bos_token_id", kwargs["vocab_size"] - 1)
    kwargs.setdefault("eos_token_id", kwargs["vocab_size"] - 1)
    ref = GPT2LMHeadModel(GPT2Config(**kwargs)).eval()
    sharpen_attention(ref)
    if train_steps:
        train_briefly(ref, kwargs["vocab_size"], steps=train_steps)
    folder = tmp_path_factory.mktemp("gpt2_ref")
    ref.save_pretrained(folder)
    return ref, folder


@pytest.fixture(scope="session")
def gpt2_ref(tmp_path_factory):
    """(transformers GPT2LMHeadModel, folder it saved) at a tiny shape with peaked attention."""
    return make_gpt2(tmp_path_factory)


@pytest.fixture(scope="session")
def gpt1_ref(tmp_path_factory):
    """(transformers OpenAIGPTLMHeadModel, folder it saved) at a tiny shape with peaked attention."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    torch.manual_seed(1)
    ref = OpenAIGPTLMHeadModel(
        OpenAIGPTConfig(vocab_size=120, n_positions=48, n_embd=64, n_layer=3, n_head=4, initializer_range=0.1)
    ).eval()
    sharpen_attention(ref)
    train_briefly(ref, 120)
    folder = tmp_path_factory.mktemp("gpt1_ref")
    ref.save_pretrained(folder)
    return ref, folder


@pytest.fixture(scope="session")
def gpt2_tok():
    from hf_gpt.tokenization import gpt2_tokenizer

    return gpt2_tokenizer()


# ---------------------------------------------------------------- training runs


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine two OpenMP threads that spin-wait
    for each other run these models ~40x slower (measured: 8 ms vs 360 ms per forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """About 17 kB of simple, learnable English, made here (tests never read shared/data)."""
    rng = random.Random(0)
    who = ["the king", "my lord", "the queen", "a fool", "good Romeo", "fair Juliet", "the duke", "this man"]
    does = ["speaks of", "loves", "hates", "calls for", "waits on", "follows", "mocks", "fears"]
    what = ["the crown", "his sword", "the night", "her honour", "the sea", "my heart", "the moon", "thy name"]
    lines = []
    for i in range(600):
        lines.append(f"{rng.choice(who).capitalize()} {rng.choice(does)} {rng.choice(what)}.")
        if i % 4 == 3:
            lines.append("")
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("\n".join(lines))
    return path


class LogitsOnly(torch.nn.Module):
    """input_ids (B, T) -> logits (B, T, vocab): the forward an exported LM serves (torch.export, ONNX)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


# ---------------------------------------------------------------- work started early, on the second core
#
# A fresh interpreter (hf-gpt convert, lm_eval, torchrun, the quick bench's children...) spends seconds importing
# torch and transformers, while this process, on one thread, waits with the second core idle. A module registers
# such work with `@early("fixture_name")`: a function that prepares its inputs (models, folders) and returns a
# callable that runs the subprocesses and returns the result. When the session starts, the work that selected tests
# will need is prepared here, one job after another (the global RNG is restored after each, so the tests draw what
# they drew before), and the subprocess parts run in one background thread, one at a time, on the other core,
# while the tests go on. The modules that read such results run last, so that the work is done by then (a fixture
# that must wait runs queued work itself meanwhile). A fixture gets what was prepared with `early_prepared(name)` at
# once, and the result with `early_result(name)`.


class _EarlyJob:
    def __init__(self, name: str, prepare) -> None:
        self.name, self.prepare = name, prepare
        self.prepared = self.result = self.error = self.run = None
        self.done = threading.Event()
        self.workdir: Path | None = None
        self.queued = False  # prepared, and in the background thread's list
        self.claimed = False  # started, by the background thread or by a fixture

    def claim(self) -> bool:
        """Take this job to run it in the calling thread, unless another thread already has."""
        with _early_lock:
            taken, self.claimed = self.claimed, True
        return not taken

    def start_preparing(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"hf_gpt-{self.name}-"))
        try:
            with torch.random.fork_rng():
                self.prepared, self.run = self.prepare(self.workdir)
        except BaseException as e:  # reported by the fixture that asks, as its own error
            self.error = e
            self.done.set()

    def execute(self) -> None:
        try:
            self.result = self.run()
        except BaseException as e:
            self.error = e
        finally:
            self.done.set()


_EARLY_WORK: dict[str, object] = {}  # fixture name -> prepare(workdir) -> (prepared, run)
_early_jobs: dict[str, _EarlyJob] = {}
_early_thread: threading.Thread | None = None
_early_lock = threading.Lock()


def early(name: str):
    """Register `prepare(workdir) -> (prepared, run)` as the early work behind fixture `name`."""

    def register(prepare):
        _EARLY_WORK[name] = prepare
        return prepare

    return register


def _early_job(name: str) -> _EarlyJob:
    job = _early_jobs.get(name)
    if job is None:  # not foreseen at the start: prepared now, and run here when its result is asked for
        job = _early_jobs[name] = _EarlyJob(name, _EARLY_WORK[name])
        job.start_preparing()
    return job


def early_prepared(name: str):
    """What the early work `name` prepared (its inputs: models, folders), without waiting for its subprocesses."""
    job = _early_job(name)
    if job.run is None and job.error is not None:
        raise job.error
    return job.prepared


def early_result(name: str):
    """The result of the early work `name`, once its subprocesses have finished. While it is not done, this thread
    runs it itself if it has not started, or else another job that has not (rather than leave its core idle)."""
    job = _early_job(name)
    while not job.done.is_set():
        if job.claim():
            job.execute()
            break
        other = next((j for j in _early_jobs.values() if j.queued and not j.claimed and j.claim()), None)
        if other is None:
            job.done.wait()
        else:
            other.execute()
    if job.error is not None:
        raise job.error
    return job.result


def _uses_early_work(item: pytest.Item) -> bool:
    return any(name in _EARLY_WORK for name in getattr(item, "fixturenames", ()))


def _skipped(item: pytest.Item) -> bool:
    """Whether a skip mark (or a skipif whose condition is already known true) leaves the test out."""
    return any(
        mark.name == "skip" or (mark.name == "skipif" and mark.args and mark.args[0] is True)
        for mark in item.iter_markers()
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Modules that read early work run after all the others (whole modules, in their own order)."""
    late = {getattr(item, "module", None) for item in items if _uses_early_work(item)}
    items[:] = [i for i in items if getattr(i, "module", None) not in late] + [
        i for i in items if getattr(i, "module", None) in late
    ]


def pytest_collection_finish(session):
    global _early_thread
    if session.config.option.collectonly:
        return
    for item in session.items:
        if _skipped(item):
            continue
        for name in getattr(item, "fixturenames", ()):
            if name in _EARLY_WORK and name not in _early_jobs:
                _early_jobs[name] = _EarlyJob(name, _EARLY_WORK[name])
    if not _early_jobs:
        return
    ready: queue.Queue = queue.Queue()

    def work() -> None:
        while (job := ready.get()) is not None:
            if job.claim():
                job.execute()

    _early_thread = threading.Thread(target=work, name="early-work", daemon=True)
    _early_thread.start()
    for job in _early_jobs.values():  # each starts running as soon as it is prepared
        job.start_preparing()
        if job.done.is_set():  # its preparation failed: the fixture reports it
            continue
        job.queued = True
        ready.put(job)
    ready.put(None)


def pytest_sessionfinish(session, exitstatus):
    if _early_thread is not None:
        _early_thread.join()  # (no subprocess outlives the session)
    for job in _early_jobs.values():
        if job.workdir is not None:
            shutil.rmtree(job.workdir, ignore_errors=True)
