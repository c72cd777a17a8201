"""The in-process decoder sizes its torch threads to the CPU left free (issue #32): fewer when other processes keep
cores busy, an explicit RAG_DECODER_THREADS (Settings.decoder_threads) always wins. The load reading is injected; no model is loaded."""

from __future__ import annotations

import pytest

from rag.errors import UserError
from rag.generation.transformers_backend import DecoderThreads, pick_decoder_threads


class FakeCpu:
    """/proc/stat as (machine busy, machine total, own) jiffies, advanced by `tick`; time advances 1 s a tick."""

    def __init__(self, cpus: int):
        self.cpus, self.busy, self.total, self.mine, self.now = cpus, 0.0, 0.0, 0.0, 0.0

    def tick(self, others: float, mine: float = 0.0, seconds: float = 1.0) -> None:
        """`others` and `mine`: cores kept busy over the next `seconds` (100 jiffies a core-second)."""
        self.busy += (others + mine) * 100 * seconds
        self.mine += mine * 100 * seconds
        self.total += self.cpus * 100 * seconds
        self.now += seconds

    def read(self) -> tuple[float, float, float]:
        return self.busy, self.total, self.mine

    def clock(self) -> float:
        return self.now


def meter(cpu: FakeCpu, setting: int | None = None, load_during_first_sample: float = 0.0) -> DecoderThreads:
    return DecoderThreads(setting=setting, cpus=cpu.cpus, read_cpu_times=cpu.read, clock=cpu.clock,
                          sleep=lambda s: cpu.tick(load_during_first_sample, seconds=s))


def test_rule():
    assert pick_decoder_threads(None, 2, 0.0) == 2
    assert pick_decoder_threads(None, 2, 1.0) == 1
    assert pick_decoder_threads(None, 2, 0.6) == 1  # a test suite at 60% of a core is enough to collapse 2 threads
    assert pick_decoder_threads(None, 2, 0.3) == 2
    assert pick_decoder_threads(None, 2, 5.0) == 1  # never below one
    assert pick_decoder_threads(None, 8, 3.0) == 5
    assert pick_decoder_threads(None, 8, 0.0, default=4) == 4  # never above torch's own choice
    assert pick_decoder_threads(None, 2, None) == 2  # no reading: torch's default


def test_fewer_threads_when_the_cpu_is_busy():
    cpu = FakeCpu(cpus=2)
    threads = meter(cpu, load_during_first_sample=0.0)
    assert threads.pick() == 2  # idle machine: both cores
    cpu.tick(others=1.0, mine=1.0)  # a one-core hog beside our own generation
    assert threads.pick() == 1
    assert threads.others_busy == pytest.approx(1.0)
    cpu.tick(others=0.0, mine=2.0)  # the hog is gone; our own busy time does not count against us
    assert threads.pick() == 2


def test_first_reading_samples_the_load_now():
    cpu = FakeCpu(cpus=2)
    assert meter(cpu, load_during_first_sample=1.0).pick() == 1
    cpu = FakeCpu(cpus=2)
    assert meter(cpu, load_during_first_sample=0.0).pick() == 2


def test_a_stale_reading_is_taken_again():
    cpu = FakeCpu(cpus=2)
    samples = []
    threads = DecoderThreads(setting=None, cpus=2, read_cpu_times=cpu.read, clock=cpu.clock,
                             sleep=lambda s: (samples.append(s), cpu.tick(1.0, seconds=s)))
    threads.pick()
    cpu.tick(others=0.0, seconds=60)  # a minute idle, then the hog starts: the fresh sample sees it
    assert threads.pick() == 1
    assert len(samples) == 2


def test_an_explicit_setting_wins():
    cpu = FakeCpu(cpus=2)
    forced = meter(cpu, setting=2, load_during_first_sample=1.0)
    cpu.tick(others=2.0)
    assert forced.pick() == 2
    assert pick_decoder_threads(3, 2, 2.0) == 3
    assert pick_decoder_threads(1, 8, 0.0) == 1


def test_the_setting_comes_from_the_environment_and_a_bad_one_is_refused(monkeypatch):
    from pydantic import ValidationError

    from rag.config import Settings

    cpu = FakeCpu(cpus=2)
    monkeypatch.setenv("RAG_DECODER_THREADS", "1")
    assert DecoderThreads(Settings().decoder_threads, cpus=2, read_cpu_times=cpu.read, clock=cpu.clock).pick() == 1
    monkeypatch.delenv("RAG_DECODER_THREADS")
    assert DecoderThreads(Settings().decoder_threads, cpus=2, read_cpu_times=cpu.read, clock=cpu.clock,
                          sleep=lambda s: cpu.tick(0.0, seconds=s)).pick() == 2
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("RAG_DECODER_THREADS", bad)
        with pytest.raises(ValidationError, match="decoder_threads"):
            Settings()
    with pytest.raises(UserError, match="at least 1"):
        DecoderThreads(0)


def test_no_proc_stat_falls_back_to_torch_default():
    threads = DecoderThreads(setting=None, cpus=4, read_cpu_times=lambda: None)
    assert threads.pick(default=4) == 4
    assert threads.others_busy is None


def test_generation_runs_with_the_picked_threads_and_restores_torchs():
    torch = pytest.importorskip("torch")
    from rag.generation.transformers_backend import TransformersGenerator

    generator = TransformersGenerator.__new__(TransformersGenerator)  # no model: only the thread sizing
    generator.device, generator._default_threads = "cpu", None
    cpu = FakeCpu(cpus=2)
    generator._threads = meter(cpu, load_during_first_sample=2.0)
    before = torch.get_num_threads()
    with generator._sized_threads() as threads:
        assert threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    generator.device = "cuda"
    with generator._sized_threads():
        assert torch.get_num_threads() == before  # the GPU path is left alone
