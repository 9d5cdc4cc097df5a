"""Speculative decoding in the native batcher (prompt lookup): the drafting, the equivalence of its answers
with plain decoding (a fake decoder whose numbers do not depend on how tokens are batched), and the real
model's passes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ortllm.runtime.backends import native
from ortllm.runtime.backends.native import NativeBatcher, lookup, speculation_choice
from ortllm.runtime.job import Job
from ortllm.runtime.options import validate_options
from ortllm.runtime.types import GenerationRequest

# ---- drafting ------------------------------------------------------------------------------------


def test_lookup_drafts_what_followed_the_latest_occurrence_of_the_last_tokens():
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 8, 2, 3]
    # the suffix (2, 3, 4) occurred at 1..3 (then 5) and at 6..8 (then 6, 7): the latest wins
    assert lookup(tokens, 4, 3) == [6, 7, 8]
    assert lookup(tokens, 4, 1) == [6]
    assert lookup(tokens, 4, 0) == []


def test_lookup_prefers_the_longest_matching_suffix():
    # (8, 3) occurred once, followed by 5; a bare 3 occurred later, followed by 6: the bigram wins
    tokens = [8, 3, 5, 1, 3, 6, 1, 8]
    assert lookup(tokens, 3, 2) == [5, 1]


def test_lookup_needs_two_matching_tokens_and_stops_at_the_end():
    assert lookup([1, 2, 3], 4, 4) == []  # 4 never occurred
    assert lookup([5, 1, 7], 1, 4) == []  # only the last token matches: too weak to draft on
    assert lookup([5, 1, 7, 5], 1, 4) == [7, 5, 1]  # the draft runs to the end of what is known


def test_speculation_is_on_unless_turned_off(monkeypatch):
    monkeypatch.delenv("ORTLLM_SPECULATION", raising=False)
    assert speculation_choice() == "ngram"
    monkeypatch.setenv("ORTLLM_SPECULATION", "OFF")
    assert speculation_choice() == "off"
    assert speculation_choice("ngram") == "ngram"
    with pytest.raises(ValueError, match="ORTLLM_SPECULATION must be ngram or off"):
        speculation_choice("medusa")


# ---- the same answers as plain decoding ------------------------------------------------------------

VOCAB = 40
EOS = 2


class FakeArena:
    """Token positions per slot in place of keys and values."""

    def __init__(self, slots: int) -> None:
        self.seqs: list[list[int]] = [[] for _ in range(slots)]
        self.warm = np.ones(slots, dtype=bool)

    def mark_warm(self, first: int, rows: int) -> None:
        pass

    def warm_up(self, limit: int) -> bool:
        return False

    def copy_prefix(self, src: int, dst: int, length: int, start: int = 0) -> None:
        self.seqs[dst] = self.seqs[dst][:start] + self.seqs[src][start:length]

    def swap(self, a: int, b: int, len_a: int, len_b: int) -> None:
        self.seqs[a], self.seqs[b] = self.seqs[b], self.seqs[a]


class FakeDecoder:
    """A decoder whose logits are a function of the sequence so far only (as real ones nearly are): a model
    that likes to repeat what followed the last token before, with hashed noise, so that drafts are kept
    sometimes and rejected sometimes. Records each pass's width."""

    ragged = True
    verifies = True
    last_only = True

    def __init__(
        self, slots: int = 4, capacity: int = 512, eos_bias: float = -4.0, copy: float = 2.0
    ) -> None:
        self.slots = slots
        self.capacity = self.initial_capacity = self.max_capacity = capacity
        self.arena = FakeArena(slots)
        self.eos_bias = eos_bias
        self.copy = copy  # how strongly it repeats what followed the last token before (4: always)
        self.passes: list[tuple[int, int]] = []  # (rows, tokens per row) of each pass

    def reserve(self, tokens: int, lengths: list[int]) -> None:
        assert tokens <= self.max_capacity

    def logits(self, seq: list[int]) -> np.ndarray:
        digest = hashlib.sha256(np.asarray(seq[-3:], dtype=np.int64).tobytes()).digest()
        out = np.frombuffer(digest * 5, dtype=np.uint8)[:VOCAB].astype(np.float32) / 64.0
        last = seq[-1]
        earlier = [i for i in range(len(seq) - 1) if seq[i] == last]
        if earlier:
            out[seq[earlier[-1] + 1]] += self.copy
        out[EOS] += self.eos_bias
        return out

    def step(self, ids, lengths, first=0, counts=None, every=False):
        rows, new = ids.shape
        counts = np.full(rows, new) if counts is None else counts
        self.passes.append((rows, new))
        out = np.zeros((rows, new, VOCAB), dtype=np.float32)
        for r in range(rows):
            assert int(lengths[r]) + new <= self.max_capacity  # as NativeDecoder.step insists
            seq = self.arena.seqs[first + r][: int(lengths[r])] + [int(t) for t in ids[r, : int(counts[r])]]
            self.arena.seqs[first + r] = seq
            for j in range(new):
                out[r, j] = self.logits(seq[: int(lengths[r]) + min(j, int(counts[r]) - 1) + 1])
        return out if every else out[np.arange(rows), counts - 1]


class Chars:
    def decode(self, token: int) -> str:
        return f"<{token}>"


def run(batcher: NativeBatcher, prompts: list[list[int]], max_new: int = 60, **options) -> list[Job]:
    jobs = []
    for i, prompt in enumerate(prompts):
        request = GenerationRequest(validate_options({"temperature": 0, "seed": i, **options}), prompt="x")
        jobs.append(Job(request, prompt, max_new, Chars))
        assert batcher.admit(jobs[-1])
    for _ in range(10_000):
        if not batcher.busy:
            break
        batcher.step()
    assert not batcher.busy
    return jobs


PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 5, 6, 7],
    [12, 13, 14, 12, 13, 15, 16, 17, 12],
    [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 20, 21],
]


@pytest.mark.parametrize(
    "options",
    [
        {},  # greedy
        {"temperature": 0.9, "top_k": 8},  # seeded sampling: one draw per token either way
        {"repeat_penalty": 1.3, "repeat_last_n": 8},  # the penalty's window moves with each kept token
        {"stop": ["<9>"]},  # a stop sequence inside a draft
    ],
    ids=["greedy", "sampled", "penalty", "stop"],
)
@pytest.mark.parametrize("rows", [1, 3])
def test_speculation_answers_as_plain_decoding(options, rows):
    answers = {}
    for mode in ("off", "ngram"):
        decoder = FakeDecoder()
        batcher = NativeBatcher(decoder, [EOS], speculation=mode)  # type: ignore[arg-type]
        jobs = run(batcher, PROMPTS[:rows], **options)
        answers[mode] = [(j.token_ids, j.events.qsize()) for j in jobs]
        drafted = sum(j.drafted_tokens for j in jobs)
        kept = sum(j.accepted_tokens for j in jobs)
        if mode == "off":
            assert drafted == kept == 0
        elif not options:  # greedy: some drafts kept, some rejected (the equality below is not trivial)
            assert 0 < kept < drafted, (kept, drafted)
        elif rows == 1:  # three sampled rows rarely all have a draft: then a wider pass does not pay
            assert drafted > 0
    assert answers["ngram"] == answers["off"]


def test_an_end_of_sequence_inside_a_draft_ends_the_answer_there():
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
    decoder = FakeDecoder(eos_bias=0.0)
    plain = run(NativeBatcher(FakeDecoder(eos_bias=0.0), [EOS], speculation="off"), prompts)  # type: ignore[arg-type]
    spec = run(NativeBatcher(decoder, [EOS], speculation="ngram"), prompts)  # type: ignore[arg-type]
    assert spec[0].token_ids == plain[0].token_ids
    assert len(spec[0].token_ids) < 60  # it ended on EOS, not on length


@pytest.mark.parametrize("max_new", [7, 100])
def test_a_draft_never_runs_past_max_tokens_or_the_arena(max_new):
    """Both limits end the answer where plain decoding ends it (the arena holds 40 tokens here)."""
    answers = {}
    for mode in ("off", "ngram"):
        decoder = FakeDecoder(capacity=40)
        (job,) = run(NativeBatcher(decoder, [EOS], speculation=mode), [PROMPTS[0]], max_new=max_new)  # type: ignore[arg-type]
        answers[mode] = job.token_ids
        assert job.drafted_tokens or mode == "off"
    assert answers["ngram"] == answers["off"]
    assert len(answers["off"]) == (7 if max_new == 7 else 40 - len(PROMPTS[0]))


def test_many_rows_decode_without_drafts(monkeypatch):
    """Past SPEC_MAX_ROWS decoding rows the padding costs more than drafts win."""
    monkeypatch.setattr(native, "SPEC_MAX_ROWS", 2)
    decoder = FakeDecoder()
    run(NativeBatcher(decoder, [EOS], speculation="ngram"), PROMPTS)  # type: ignore[arg-type]
    three = [new for rows, new in decoder.passes[1:] if rows == 3]
    two = [new for rows, new in decoder.passes[1:] if rows <= 2]
    assert three and max(three) == 1
    assert not two or max(two) >= 1  # fewer rows may draft again


# ---- on the real model ---------------------------------------------------------------------------

REPEAT = [
    {
        "role": "user",
        "content": "Repeat this text exactly: The quick brown fox jumps over the lazy dog. "
        "Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump.",
    }
]


@pytest.fixture(scope="module")
def spec_sched(pulled):
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler
    from ortllm.store import ModelStore
    from tests.conftest import DEFAULT_MODEL

    scheduler = Scheduler(LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="native"), batcher="native")
    yield scheduler
    scheduler.close()


def test_a_verifying_pass_gives_each_position_the_logits_of_a_pass_ending_there(spec_sched):
    """step(every=True): position j's logits are those of a pass of the first j + 1 tokens (the same
    numbers, not approximately), in ragged rows too."""
    batcher = spec_sched.backends[0]
    decoder = batcher.decoder
    if not decoder.verifies:
        pytest.skip("needs onnxruntime >= 1.32 (GroupQueryAttention query_seqlens)")
    prompt = np.arange(300, 340, dtype=np.int64)[None, :]
    draft = np.asarray([[1000, 2000, 3000, 4000]], dtype=np.int64)

    def check():
        batcher.slots = [native._Slot() for _ in batcher.slots]
        for slot in (0, 1):
            decoder.step(prompt, np.asarray([0]), slot)
        every = decoder.step(draft, np.asarray([40]), 0, every=True)
        assert every.shape == (1, 4, decoder.vocab)
        for j in range(1, 4):  # (a pass of one token takes onnxruntime's one-token path: other numbers)
            alone = decoder.step(draft[:, : j + 1], np.asarray([40]), 1)
            assert np.array_equal(alone[0], every[0, j]), j
        two = decoder.step(draft[:, :2], np.asarray([40]), 1, every=True)
        assert np.array_equal(two[0], every[0, :2])
        ids = np.zeros((2, 4), dtype=np.int64)
        ids[0, :2], ids[1] = draft[0, :2], draft[0]
        ragged = decoder.step(ids, np.asarray([40, 40]), 0, np.asarray([2, 4]), every=True)
        assert np.array_equal(ragged[0, :2], every[0, :2]) and np.array_equal(ragged[1], every[0])
        assert np.array_equal(ragged[0, 3], ragged[0, 1])  # padding repeats the last valid position

    spec_sched.call(check)


def test_the_real_model_drafts_and_answers_as_plain_decoding_but_at_near_ties(spec_sched):
    """A verifying pass computes a token's numbers with its neighbours (onnxruntime's multi-token attention
    path), plain decoding one by one: the logits differ in the last bits, which int8 activations amplify to
    a few tenths. So the greedy answers agree except where plain decoding's two best tokens were within a
    logit of each other, and there they may part."""
    batcher = spec_sched.backends[0]
    if not batcher.decoder.verifies:
        pytest.skip("needs onnxruntime >= 1.32 (GroupQueryAttention query_seqlens)")

    plain, spec = both_ways(spec_sched, REPEAT, 48)
    assert spec.timings.accepted_draft_tokens > 0 and spec.timings.draft_tokens > 0
    assert_parted_only_at_a_near_tie(plain, spec)


def both_ways(scheduler, messages, max_tokens: int):
    """The greedy answer without and with speculation (fresh caches each time), with log-probabilities."""
    batcher = scheduler.backends[0]

    def answer(speculate: bool):
        batcher.speculate = speculate
        batcher.slots = [native._Slot() for _ in batcher.slots]
        options = validate_options({"temperature": 0, "max_tokens": max_tokens})
        return scheduler.generate(GenerationRequest(options, messages=messages, logprobs=2))

    try:
        plain = answer(False)
        spec = answer(True)
    finally:
        batcher.speculate = True
    assert plain.timings.draft_tokens == 0
    return plain, spec


def assert_parted_only_at_a_near_tie(plain, spec) -> None:
    a, b = plain.token_ids, spec.token_ids
    if a == b:
        return
    # where they part (one may have ended there: its end-of-sequence token is not in token_ids)
    parted = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
    longer = plain if parted < len(a) else spec
    assert longer.logprobs is not None
    top = longer.logprobs[parted].top
    assert top[0][2] - top[1][2] < 1.0, (parted, top)


@pytest.mark.slow
@pytest.mark.model
def test_code_editing_on_qwen_keeps_most_drafts(qwen):
    """The workload prompt lookup is for: the answer copies most of the prompt (measured here: 60 of 81
    drafted tokens kept, decoding 1.7x as fast; benchmarks/NOTES.md)."""
    from benchmarks.workload import CODE, EDITS
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler
    from ortllm.store import ModelStore
    from tests.conftest import TOOL_MODEL

    scheduler = Scheduler(LoadedModel(ModelStore().get(TOOL_MODEL), batcher="native"), batcher="native")
    try:
        if not scheduler.backends[0].decoder.verifies:
            pytest.skip("needs onnxruntime >= 1.32 (GroupQueryAttention query_seqlens)")
        ask = f"{EDITS[2]}\n\n```python\n{CODE[2]}```"  # one of benchmarks/workload.py's code edits
        plain, spec = both_ways(scheduler, [{"role": "user", "content": ask}], 120)
    finally:
        scheduler.close()
    assert "kind" in spec.text
    kept, drafted = spec.timings.accepted_draft_tokens, spec.timings.draft_tokens
    assert kept >= 20 and kept >= 0.5 * drafted, (kept, drafted)
    assert_parted_only_at_a_near_tie(plain, spec)


def test_a_row_near_the_end_of_the_arena_bounds_the_others_drafts():
    """A pass writes every row whole, padding included: another row's draft must not push a row that is
    nearly at the arena's end past it."""
    answers = {}
    for mode in ("off", "ngram"):
        decoder = FakeDecoder(capacity=46, copy=4.0)  # both rows draft at every step
        long = [5, 6, 7, 8, 9] * 7 + [5, 6]  # 37 tokens: 9 left
        jobs = run(NativeBatcher(decoder, [EOS], speculation=mode), [long, PROMPTS[0]], max_new=30)  # type: ignore[arg-type]
        answers[mode] = [j.token_ids for j in jobs]
        assert mode == "off" or sum(j.drafted_tokens for j in jobs) > 0
    assert answers["ngram"] == answers["off"]
