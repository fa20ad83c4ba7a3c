"""A capability suite: complete the next line exactly (scaling/tasks_fit.py forecasts it from compute).

GPT-4 forecast HumanEval pass rates from small models, and Llama 3 forecast benchmark accuracy through the
log-likelihood of the right answer; both need a benchmark every rung of a ladder is scored on. keel's
built-in one needs no download: problems drawn from the held-out (`val`) split of the prepared corpus,
each a prefix ending at a line break and, as the answer, the tokens of the exact next line (up to and
including the next token that holds a line break). With the byte tokenizer the answer is the line's bytes
and its "\\n"; with BPE, whose whitespace tokens may carry the next line's indentation ("\\n   "), it is
the line's tokens up to that whitespace token, as the model saw them in training. A user task file (JSONL,
one {"prompt": ..., "answer": ...} a line) is tokenized with the corpus's tokenizer instead.

A completion passes when it reproduces the answer's tokens exactly. Passing requires every earlier token
to have been the answer's, so at step t a completion that can still pass has been fed the prompt and
answer[:t]: exactly the input of one teacher-forced forward pass over prompt + answer. That one pass
therefore gives, per problem, the greedy pass (argmax = answer token at every step), the exact
probability that a sample at the temperature reproduces the answer (the product of the answer tokens'
probabilities), and the pass rate of `samples` samples (inverse-CDF sampling, each step's uniform draw
landing in the answer token's interval), identical to sampling token by token and stopping at the first
wrong token, without generating anything.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .corpus import DataError, read_meta
from .tokenizer import load_tokenizer

HELDOUT = "heldout"
# The built-in suite scans at most this many tokens of the val split: enough lines for any suite size,
# and bounded memory on a corpus whose held-out split is billions of tokens.
MAX_SCAN_TOKENS = 1 << 24
# Problems in the built-in suite (train.task_problems): each costs a share of one forward pass.
HELDOUT_PROBLEMS = 512
# Logit elements (rows x positions x vocab, fp32) one forward pass may produce: 256 MiB.
LOGITS_PER_BATCH = 1 << 26


@dataclass(frozen=True)
class Problem:
    prompt: tuple[int, ...]  # token ids; for the built-in suite they end with a line break
    answer: tuple[int, ...]  # token ids the completion must reproduce exactly


def corpus_tokenizer(data_dir: str | Path):
    meta = read_meta(data_dir)
    return load_tokenizer(meta["tokenizer"], Path(data_dir)), meta


def _line_break_ids(tok, vocab_size: int) -> np.ndarray:
    """Mask over the vocabulary of the tokens whose text holds a line break ("\\n" for bytes; for BPE also
    whitespace runs such as "\\n\\n" or "\\n    ")."""
    return np.array(["\n" in tok.decode([i]) for i in range(vocab_size)])


def _val_tokens(data_dir: Path, meta: dict) -> np.ndarray:
    parts, n = [], 0
    for shard in meta["splits"]["val"]["shards"]:  # each document, hence each shard, ends with eot
        tokens = np.memmap(data_dir / shard["file"], dtype=meta["dtype"], mode="r")[:MAX_SCAN_TOKENS - n]
        parts.append(np.asarray(tokens, dtype=np.int64))
        n += len(parts[-1])
        if n >= MAX_SCAN_TOKENS:
            break
    return np.concatenate(parts)


def build_suite(data_dir: str | Path, n_problems: int = HELDOUT_PROBLEMS, prefix_tokens: int = 128, min_answer_tokens: int = 3,
                max_answer_tokens: int = 16, seed: int = 0) -> list[Problem]:
    """`n_problems` next-line problems from the val split, the same for the same corpus and arguments.

    Candidates are the lines of min..max_answer_tokens tokens (break included) that are not blank and
    follow at least `prefix_tokens` tokens of their own document (the prompt: those tokens, never
    crossing into another document). A seeded permutation picks among them; the suite is in corpus order.
    Short answers keep some problems within reach of tiny byte-level models ("    else:\\n").
    """
    data_dir = Path(data_dir)
    tok, meta = corpus_tokenizer(data_dir)
    if "val" not in meta["splits"]:
        raise DataError(f"{data_dir} has no 'val' split to draw the task suite from; re-run `keel data prepare`")
    if not 1 <= min_answer_tokens <= max_answer_tokens or prefix_tokens < 1 or n_problems < 1:
        raise ValueError(f"need n_problems >= 1, prefix_tokens >= 1 and 1 <= min_answer_tokens <= max_answer_tokens, "
                         f"got {n_problems}, {prefix_tokens}, {min_answer_tokens}, {max_answer_tokens}")
    tokens = _val_tokens(data_dir, meta)
    breaks = np.flatnonzero(_line_break_ids(tok, meta["vocab_size"])[tokens])
    starts, ends = breaks[:-1] + 1, breaks[1:] + 1  # answer = tokens[start:end], its closing break included
    eots = np.flatnonzero(tokens == meta["eot"])
    first_eot_after = np.searchsorted(eots, starts)
    doc_start = np.where(first_eot_after > 0, eots[np.maximum(first_eot_after - 1, 0)] + 1, 0)
    ok = ((ends - starts >= min_answer_tokens) & (ends - starts <= max_answer_tokens)
          & (first_eot_after == np.searchsorted(eots, ends))  # no document boundary inside the answer
          & (starts - doc_start >= prefix_tokens))
    candidates = np.flatnonzero(ok)
    chosen = []
    for i in np.random.default_rng(seed).permutation(len(candidates)):
        start, end = starts[candidates[i]], ends[candidates[i]]
        if tok.decode(tokens[start:end]).strip():
            chosen.append((start, end))
            if len(chosen) == n_problems:
                break
    if not chosen:
        raise DataError(f"the val split of {data_dir} has no non-blank line of {min_answer_tokens}-{max_answer_tokens} "
                        f"tokens after {prefix_tokens} tokens of its document; lower prefix_tokens or use a task file")
    return [Problem(tuple(int(t) for t in tokens[s - prefix_tokens:s]), tuple(int(t) for t in tokens[s:e]))
            for s, e in sorted(chosen)]


def load_suite(path: str | Path, data_dir: str | Path) -> list[Problem]:
    """A user's task file: JSONL, one {"prompt": "...", "answer": "..."} a line, tokenized with the corpus's
    tokenizer. Each prompt is read as the start of a document (after the end-of-text token, as documents
    are in training), which also gives an empty prompt something to condition on. Prompt and answer are
    tokenized separately: with BPE, end the prompt where a token boundary falls naturally (a line break)."""
    path = Path(path)
    tok, meta = corpus_tokenizer(data_dir)
    if not path.is_file():
        raise DataError(f"task file {str(path)!r} does not exist; "
                        f"give a JSONL file of {{\"prompt\", \"answer\"}} lines")
    problems = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, answer = row["prompt"], row["answer"]
            if not (isinstance(prompt, str) and isinstance(answer, str) and answer):
                raise TypeError("prompt and answer must be strings, the answer non-empty")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{n}: expected a JSON object with string \"prompt\" and \"answer\" "
                            f"fields ({e})") from e
        problems.append(Problem((meta["eot"], *(int(t) for t in tok.encode(prompt))),
                                tuple(int(t) for t in tok.encode(answer))))
    if not problems:
        raise DataError(f"task file {path} holds no problems; add {{\"prompt\": ..., \"answer\": ...}} lines")
    return problems


def suite_for(spec: str, data_dir: str | Path, n_problems: int = HELDOUT_PROBLEMS) -> list[Problem]:
    """train.tasks: "heldout" (the built-in suite of `n_problems`) or the path of a task file."""
    return build_suite(data_dir, n_problems) if spec == HELDOUT else load_suite(spec, data_dir)


def suite_fingerprint(problems: list[Problem]) -> str:
    """Of the problems' tokens: records scored on different suites are never fitted together."""
    text = json.dumps([[p.prompt, p.answer] for p in problems])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _window(p: Problem, context: int) -> list[int]:
    """The inputs that score `p`: prompt + answer without its last token, left-truncated to `context`
    tokens, so the whole answer is scored in one window (a completion generated in that window sees the
    same tokens)."""
    return [*p.prompt, *p.answer[:-1]][-context:]


@torch.no_grad()
def _answer_steps(model: nn.Module, problems: list[Problem], device, context: int, temperature: float) -> list[dict]:
    """Per problem, per answer token: its NLL (temperature 1), its log-probability at `temperature`,
    whether it is the argmax, and the [lo, hi) interval of the temperature CDF that samples it."""
    windows = [_window(p, context) for p in problems]
    width = max(len(w) for w in windows)
    out, vocab, i = [], None, 0
    while i < len(problems):
        # The first forward pass learns the vocabulary size; the rest fill the logits budget.
        rows = 1 if vocab is None else max(1, LOGITS_PER_BATCH // (width * vocab))
        batch, chunk = problems[i:i + rows], windows[i:i + rows]
        i += len(batch)
        # Right-padded: under causal attention padding after a row's tokens cannot change their logits.
        inputs_BT = torch.zeros(len(batch), width, dtype=torch.long)
        for b, w in enumerate(chunk):
            inputs_BT[b, :len(w)] = torch.tensor(w)
        logits_BTV = model(inputs_BT.to(device)).float()
        vocab = logits_BTV.shape[-1]
        rows_N = torch.tensor([b for b, p in enumerate(batch) for _ in p.answer], device=logits_BTV.device)
        pos_N = torch.tensor([len(w) - len(p.answer) + t for w, p in zip(chunk, batch) for t in range(len(p.answer))],
                             device=logits_BTV.device)
        target_N1 = torch.tensor([a for p in batch for a in p.answer], device=logits_BTV.device)[:, None]
        logits_NV = logits_BTV[rows_N, pos_N]
        nll_N = -logits_NV.log_softmax(-1).gather(1, target_N1)[:, 0]
        greedy_N = logits_NV.argmax(-1) == target_N1[:, 0]
        logq_NV = (logits_NV / temperature).log_softmax(-1)
        q_NV = logq_NV.double().exp()
        hi_N = q_NV.cumsum(-1).gather(1, target_N1)[:, 0]
        lo_N = hi_N - q_NV.gather(1, target_N1)[:, 0]
        logq_N = logq_NV.gather(1, target_N1)[:, 0]
        n = 0
        for p in batch:
            k = slice(n, n + len(p.answer))
            out.append({"nll": nll_N[k].cpu().numpy().astype(float), "greedy": greedy_N[k].cpu().numpy(),
                        "logq": logq_N[k].cpu().numpy().astype(float), "lo": lo_N[k].cpu().numpy(),
                        "hi": hi_N[k].cpu().numpy()})
            n += len(p.answer)
    return out


def _short(x: float) -> float:
    return float(f"{x:.6g}")


def evaluate_suite(model: nn.Module, problems: list[Problem], device, samples: int = 8, temperature: float = 1.0,
                   seed: int = 0, context: int | None = None) -> dict:
    """Score `model` (logits [B, T, V] from token ids [B, T]) on `problems`.

    Per problem: `greedy` (1 when the greedy completion of len(answer) tokens is the answer), `pass_rate`
    (the fraction of `samples` completions at `temperature` that are), `pass_prob` (the exact probability
    that one is: the limit of pass_rate as samples grow), `answer_nll` (mean NLL per answer token, nats, at
    temperature 1). Aggregates are their means over problems. `context` (default model.cfg.max_seq_len)
    is the window a problem is scored in. The samples' uniform draws come from `seed` alone, so the same
    model scores the same whatever the batching, and every model of a ladder is sampled with the same
    draws (common random numbers: differences between rungs are the models', not the dice's).
    """
    if samples < 1 or not temperature > 0:
        raise ValueError(f"need samples >= 1 and temperature > 0, got samples={samples}, temperature={temperature}")
    context = context or model.cfg.max_seq_len
    was_training = model.training
    model.eval()
    try:
        steps = _answer_steps(model, problems, device, context, temperature)
    finally:
        model.train(was_training)
    draws = np.random.default_rng(seed).random((len(problems), samples, max(len(p.answer) for p in problems)))
    rows = {"pass_rate": [], "greedy": [], "pass_prob": [], "answer_nll": []}
    for u, s in zip(draws, steps):
        u = u[:, :len(s["lo"])]
        rows["pass_rate"].append(float(np.all((s["lo"] <= u) & (u < s["hi"]), axis=1).mean()))
        rows["greedy"].append(int(s["greedy"].all()))
        rows["pass_prob"].append(math.exp(s["logq"].sum()))
        rows["answer_nll"].append(float(s["nll"].mean()))
    means = {"pass_rate": float(np.mean(rows["pass_rate"])), "greedy_accuracy": float(np.mean(rows["greedy"])),
             "pass_prob": float(np.mean(rows["pass_prob"])), "answer_nll": float(np.mean(rows["answer_nll"]))}
    return {"suite": suite_fingerprint(problems), "problems": len(problems), "samples": samples,
            "temperature": temperature, "seed": seed, "context": context, **{k: _short(v) for k, v in means.items()},
            "per_problem": {k: [v if k == "greedy" else _short(v) for v in vs] for k, vs in rows.items()}}


def run_tasks(spec: str, data_dir: str | Path, model: nn.Module, device, samples: int = 8,
              context: int | None = None, n_problems: int = HELDOUT_PROBLEMS) -> dict:
    """The RunRecord's `tasks`: the suite `spec` names (see suite_for), evaluated, with its source."""
    problems = suite_for(spec, data_dir, n_problems)
    return {"source": spec, **evaluate_suite(model, problems, device, samples=samples, context=context)}
