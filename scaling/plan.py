"""`keel scale plan`: an IsoFLOP ladder of small runs, and the held-out run that checks its prediction.

Budgets are exact training FLOPs (training/flops.py), spaced evenly in log space. Model sizes come from one
geometric grid shared by every budget (each a factor `size_step` from the next), so that a size recurs at
several budgets with different token counts: IsoFLOP curves for Approach 2, and several learning-rate
schedules per size for the loss-curve law (scaling/curve.py). Each budget takes the `sizes` grid sizes
nearest its expected optimum, from a Chinchilla prior (D = 20 N tokens); the fits, not the prior,
decide where the optimum is. The prior counts the budget in exact FLOPs (see expected_optimum).

Hyperparameters follow DeepSeek LLM's compute rules (Bi et al. 2024, eq. 1), fitted on their IsoFLOP
sweeps: peak learning rate 0.3118 C^-0.125 and batch 0.2920 C^0.3271 tokens, both for the compute-optimal
model at C. Both are taken at one reference point, the ladder's geometric middle budget and the width of
its expected optimum, and carried from there: the rate along C by DeepSeek's exponent, and across widths by
muP's rule for Adam's hidden weights (Yang et al. 2022, Tensor Programs V, table 3: lr ~ 1/fan_in), so that
no size runs at a rate tuned for another (with one rate per budget, the larger sizes of this machine's
first ladder ran 5% worse than at a quarter of it). The batch, as a power of two of sequences, serves the
whole ladder and its check run: a batch that doubles between two budgets halves the steps of the runs
past it and bends the compute frontier there (it did, at the last budget of that first ladder). The rate
is then a smooth function of (C, width); an optimum re-taken at each budget would move it in jumps.

The schedule is the base config's cosine (its horizon is every run's own length, as Hoffmann et al.
require) with a 10% warmup; every run evaluates the same held-out windows.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..training.config import Config, ConfigError, ModelConfig, load_config
from ..training.flops import count_params, training_flops_per_token


class LadderError(ConfigError):
    """A ladder (or a set of runs) that cannot give a trustworthy fit, with the fix, in one line: a user
    error like a bad config, never retried."""


# Shapes: head dimension 8 (RoPE needs it even; small, so that widths come in fine steps), depth 2-32 (a
# one-layer model falls off the trend of the others: Kaplan et al. 2020, fig. 5), and a width/depth ratio
# near 16 and within 8-64, where Kaplan et al. find the loss nearly flat in aspect ratio. Irregular shapes
# (one layer here, four there) add noise in N that the fits cannot tell from the law.
HEAD_DIM, ASPECT = 8, 16.0
MIN_STEPS = 20
MIN_TOKENS_PER_PARAM = 2.0
# The held-out set every run is scored on, in sequences. 64 sequences of 64 tokens are too few to stand for
# the validation split: one trained model (ladder D's check run, seeds 1 and 2) scored 6-10% apart on two
# such sets. A set 8x larger cost ladder E's budgets 6% more wall time (benchmarks/RESULTS.md).
EVAL_SEQUENCES = 512


@dataclass
class Rung:
    name: str
    budget: float           # the IsoFLOP budget this run belongs to
    role: str               # "ladder" (fitted) or "check" (held out, predicted before it runs)
    dim: int
    n_layers: int
    n_heads: int
    steps: int
    global_batch_size: int
    eval_batches: int
    warmup_steps: int
    lr: float
    params: int             # non-embedding parameters (the N of the fits)
    tokens: int
    flops: float            # exact, after rounding steps: within a few % of the budget
    seed: int | None = None  # train.seed, where a rung repeats another under a new seed (else the base config's)

    def overrides(self) -> list[str]:
        return [f"model.dim={self.dim}", f"model.n_layers={self.n_layers}", f"model.n_heads={self.n_heads}",
                f"model.n_kv_heads={self.n_heads}", "model.ffn_dim=null", f"train.steps={self.steps}",
                f"train.global_batch_size={self.global_batch_size}",
                f"train.micro_batch_size={self.global_batch_size}", f"train.eval_batches={self.eval_batches}",
                "train.eval_every=0", f"schedule.warmup_steps={self.warmup_steps}", f"optim.lr={self.lr:.6g}",
                f"train.name={self.name}", *([f"train.seed={self.seed}"] if self.seed is not None else [])]


@dataclass
class Ladder:
    base: str | None                 # the base config file (None: keel's defaults)
    base_overrides: list[str]
    output_dir: str                  # every rung's run directory is output_dir/<rung name>
    target_flops: float | None       # the big run the ladder is for
    rungs: list[Rung] = field(default_factory=list)
    eval_every_fraction: float = 0.1  # evals along each run: the curves the curve law is fitted to

    def config(self, rung: Rung) -> Config:
        return load_config(self.base, self.run_overrides(rung))

    def run_overrides(self, rung: Rung) -> list[str]:
        every = max(1, round(rung.steps * self.eval_every_fraction))
        return [*self.base_overrides, *rung.overrides(), f"train.output_dir={self.output_dir}",
                f"train.eval_every={every}", "checkpoint.interval=0"]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(asdict(self), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "Ladder":
        try:
            d = yaml.safe_load(Path(path).read_text())
            d["rungs"] = [Rung(**r) for r in d.get("rungs", [])]
            return cls(**d)
        except (OSError, TypeError, KeyError, yaml.YAMLError) as e:
            raise LadderError(f"{path} is not a ladder written by `keel scale plan` ({e})") from None


def parse_budgets(spec: str) -> list[float]:
    """"1e11:1e13:4" -> four budgets evenly spaced in log space from 1e11 to 1e13; "1e11,3e11" as given."""
    try:
        if ":" in spec:
            lo, hi, n = spec.split(":")
            lo_, hi_, n_ = float(lo), float(hi), int(n)
            if n_ < 2 or not 0 < lo_ < hi_:
                raise ValueError
            return [lo_ * (hi_ / lo_) ** (i / (n_ - 1)) for i in range(n_)]
        return sorted(float(b) for b in spec.split(","))
    except ValueError:
        raise LadderError(f"--budgets {spec!r}: write LOW:HIGH:COUNT (e.g. 1e11:1e13:4, LOW < HIGH, COUNT >= 2) "
                          f"or a comma-separated list of FLOPs") from None


def shape_for(target_params: float, base: ModelConfig) -> tuple[int, int, int]:
    """(dim, n_layers, n_heads) whose non-embedding parameter count is nearest `target_params`, with the
    width/depth ratio near ASPECT."""
    best, best_cost = None, math.inf
    for dim in range(2 * HEAD_DIM, 4097, HEAD_DIM):
        for layers in range(2, 33):
            if not 8 <= dim / layers <= 64:
                continue
            n = non_embedding(dim, layers, base)
            cost = abs(math.log(n / target_params)) + 0.1 * abs(math.log(dim / layers / ASPECT))
            if cost < best_cost:
                best, best_cost = (dim, layers, dim // HEAD_DIM), cost
    return best


def non_embedding(dim: int, layers: int, base: ModelConfig) -> int:
    return count_params(model_config(dim, layers, base)).non_embedding


def model_config(dim: int, layers: int, base: ModelConfig) -> ModelConfig:
    heads = dim // HEAD_DIM
    return ModelConfig(vocab_size=base.vocab_size, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads,
                       max_seq_len=base.max_seq_len, tie_embeddings=base.tie_embeddings, qk_norm=base.qk_norm)


def deepseek_lr(flops: float) -> float:
    return 0.3118 * flops ** -0.125


def deepseek_batch_tokens(flops: float) -> float:
    return 0.2920 * flops ** 0.3271


def plan(base: str | None, base_overrides: list[str], budgets: list[float], sizes: int = 5,
         size_step: float = 2.0, target_flops: float | None = None, check_factor: float = 10.0,
         output_dir: str = "runs/ladder", name: str = "ladder", tokens_per_param: float = 20.0,
         eval_sequences: int = EVAL_SEQUENCES) -> Ladder:
    """The ladder: `sizes` runs per budget around the expected optimum (tokens_per_param tokens per
    parameter: Chinchilla's 20 by default), and one check run at check_factor x the largest budget (0: none),
    every run scored on the same `eval_sequences` held-out sequences."""
    if len(budgets) < 3:
        raise LadderError(f"{len(budgets)} budget(s): a fit needs at least 3 (>= 5 over two decades for a real "
                          f"ladder); widen --budgets")
    if max(budgets) / min(budgets) < 10 - 1e-9:
        raise LadderError(f"the budgets span {max(budgets) / min(budgets):.1f}x: at least one decade (10x) is "
                          f"needed to measure exponents; widen --budgets")
    if sizes < 3:
        raise LadderError(f"--sizes {sizes}: an IsoFLOP curve needs at least 3 sizes per budget (4-10 usual)")
    cfg = load_config(base, base_overrides)
    T = cfg.data.seq_len
    grid_exponent = lambda n: math.log(n) / math.log(size_step)  # noqa: E731 - a one-line change of base
    ladder = Ladder(base, list(base_overrides), output_dir, target_flops)
    roles = [(b, "ladder") for b in budgets] + ([(max(budgets) * check_factor, "check")] if check_factor else [])
    middle = math.exp(sum(math.log(b) for b in budgets) / len(budgets))
    batch = 2 ** round(math.log2(max(deepseek_batch_tokens(middle) / T, 1)))
    reference_dim = shape_for(expected_optimum(middle, tokens_per_param, cfg.model, T), cfg.model)[0]
    for budget, role in roles:
        k = round(grid_exponent(expected_optimum(budget, tokens_per_param, cfg.model, T)))
        if role == "check":  # a size the ladder ran, so that its whole curve can be predicted too
            ran = [round(grid_exponent(r.params)) for r in ladder.rungs]
            k = min(k, max((j for j in set(ran) if ran.count(j) >= 2), default=k))
        # Sizes below the smallest shape collapse onto it: the window then slides up to stay `sizes` wide.
        j, wanted, taken = k - (sizes - 1) // 2 if role == "ladder" else k, 1 if role == "check" else sizes, 0
        while taken < wanted:
            rung = _rung(budget, role, size_step ** j, cfg, T, name, batch, reference_dim)
            j += 1
            if rung is None:  # too big to see MIN_STEPS steps at this budget, and so is every larger size
                break
            if all(r.name != rung.name for r in ladder.rungs):
                ladder.rungs.append(rung)
                taken += 1
    _fix_eval_set(ladder, eval_sequences)
    validate_ladder(ladder)
    return ladder


def expected_optimum(budget: float, tokens_per_param: float, base: ModelConfig, T: int) -> float:
    """The N whose run at `budget` sees tokens_per_param x N tokens, counting the budget in exact FLOPs:
    in small models the output layer and attention are a large share of the FLOPs, which C = 6ND ignores
    (at 16k non-embedding parameters and a 256-token vocabulary, 6ND is under half the exact count)."""
    lo, hi = math.log(1e2), math.log(1e13)
    for _ in range(60):  # bisection in log N: tokens / N falls as N grows
        mid = (lo + hi) / 2
        dim, layers, _ = shape_for(math.exp(mid), base)
        m = model_config(dim, layers, base)
        n = count_params(m).non_embedding
        tokens = budget / training_flops_per_token(m, T)
        lo, hi = (mid, hi) if tokens / n > tokens_per_param else (lo, mid)
    return math.exp(lo)


def size_aware_lr(budget: float, dim: int, reference_dim: int) -> float:
    """DeepSeek's rate at `budget` for a model of width reference_dim, moved to width `dim` by muP's
    1/width rule for Adam."""
    return deepseek_lr(budget) * reference_dim / dim


def _rung(budget: float, role: str, target_params: float, cfg: Config, T: int, prefix: str, batch: int,
          reference_dim: int) -> Rung | None:
    dim, layers, heads = shape_for(target_params, cfg.model)
    m = model_config(dim, layers, cfg.model)
    per_token = training_flops_per_token(m, T)
    tokens = budget / per_token
    while batch > 1 and tokens / (batch * T) < MIN_STEPS:
        batch //= 2
    steps = round(tokens / (batch * T))
    n = count_params(m).non_embedding
    if steps < MIN_STEPS or steps * batch * T < MIN_TOKENS_PER_PARAM * n:
        return None  # too big a model for this budget: it would not see enough data to mean anything
    tag = "-check" if role == "check" else ""
    return Rung(name=f"{prefix}{tag}-c{budget:.2g}-n{n / 1e3:.0f}k".replace("+", ""), budget=budget, role=role,
                dim=dim, n_layers=layers, n_heads=heads, steps=steps, global_batch_size=batch, eval_batches=1,
                warmup_steps=max(1, round(0.1 * steps)), lr=round(size_aware_lr(budget, dim, reference_dim), 6),
                params=n, tokens=steps * batch * T, flops=per_token * steps * batch * T)


def _fix_eval_set(ladder: Ladder, eval_sequences: int) -> None:
    # One held-out set for every run: eval_batches x batch sequences is the same number everywhere, a
    # multiple of the largest batch (batches are powers of two, so every batch divides it).
    if eval_sequences < 1:
        raise LadderError(f"--eval-sequences {eval_sequences}: the held-out set needs at least one sequence "
                          f"(default {EVAL_SEQUENCES})")
    largest = max(r.global_batch_size for r in ladder.rungs)
    sequences = -(-eval_sequences // largest) * largest
    for r in ladder.rungs:
        r.eval_batches = sequences // r.global_batch_size


def validate_ladder(ladder: Ladder) -> None:
    fitted = [r for r in ladder.rungs if r.role == "ladder"]
    by_budget: dict[float, int] = {}
    for r in fitted:
        by_budget[r.budget] = by_budget.get(r.budget, 0) + 1
    thin = {b: n for b, n in by_budget.items() if n < 3}
    if len(by_budget) < 3 or thin:
        raise LadderError(f"budgets with fewer than 3 runs ({', '.join(f'{b:.2g}: {n}' for b, n in thin.items())}"
                          f"{'' if thin else f'{len(by_budget)} budgets'}): each budget needs >= 3 model sizes "
                          f"that fit {MIN_STEPS}+ steps; raise the smallest budget or shorten data.seq_len")
    sets = {r.eval_batches * r.global_batch_size for r in ladder.rungs}
    if len(sets) > 1:
        raise LadderError(f"the runs evaluate different held-out sets ({sorted(sets)} sequences); give every rung "
                          f"the same eval_batches x global_batch_size")
