"""`keel scale plan|run|fit|predict|report|check`: predictable scaling from the command line.

The work lives in scaling/; this file parses arguments and prints. Nothing here imports torch or Ray
until a verb needs it (`run` trains; the others are numpy and scipy).
"""
from __future__ import annotations


def cmd_plan(args) -> None:
    from ..scaling.plan import parse_budgets, plan

    overrides = [*args.overrides, *([f"train.tasks={args.tasks}"] if args.tasks else [])]
    ladder = plan(args.base, overrides, parse_budgets(args.budgets), sizes=args.sizes,
                  size_step=args.size_step, target_flops=args.target_flops, check_factor=args.check_factor,
                  output_dir=args.output_dir, name=args.name, tokens_per_param=args.tokens_per_param,
                  eval_sequences=args.eval_sequences)
    ladder.save(args.out)
    fitted = [r for r in ladder.rungs if r.role == "ladder"]
    budgets = sorted({r.budget for r in fitted})
    total = sum(r.flops for r in fitted)
    check = [r for r in ladder.rungs if r.role == "check"]
    print(f"wrote {args.out}: {len(fitted)} runs over {len(budgets)} budgets ({budgets[0]:.2g} to {budgets[-1]:.2g} "
          f"FLOPs), {total:.3g} FLOPs in all"
          + (f"; check run {check[0].name} at {check[0].flops:.3g} FLOPs ({check[0].flops / total:.1f}x the ladder)"
             if check else "")
          + (f"; target {args.target_flops:.3g} FLOPs = {args.target_flops / total:,.0f}x the ladder"
             if args.target_flops else ""))
    print(f"run it with: keel scale run {args.out}")


def cmd_run(args) -> None:
    from ..scaling.plan import Ladder
    from ..scaling.runner import run_ladder

    ladder = Ladder.load(args.ladder)
    roles = ("ladder", "check") if args.check else ("ladder",)
    status = run_ladder(ladder, roles, address=args.address, parallel=args.parallel)
    failed = {k: v for k, v in status.items() if v.startswith("failed")}
    done = sum(v.startswith("done") for v in status.values())
    print(f"{done} of {len(status)} runs finished" + (f"; failed: {', '.join(f'{k} ({v})' for k, v in failed.items())}"
                                                       if failed else "")
          + f"; fit them with: keel scale fit {args.ladder} -o fit.json")
    if failed:
        raise SystemExit(1)


def cmd_fit(args) -> None:
    from ..scaling.fit import agreement_at, fit_points
    from ..scaling.points import load_points

    points = load_points(args.runs)
    fit = fit_points(points, replicates=args.replicates)
    fit.save(args.out)
    a3 = fit.approach3
    print(f"approach 3 on {len(points)} runs: L = {a3.E:.4f} + {a3.A:.4g}/N^{a3.alpha:.4f} + {a3.B:.4g}/D^{a3.beta:.4f} "
          f"({len(fit.replicates)} bootstrap refits)")
    if fit.approach2 is not None:
        print(f"approach 2: N* ~ C^{fit.approach2.n_exponent:.3f}, D* ~ C^{fit.approach2.d_exponent:.3f}")
    if fit.frontier is not None:
        f = fit.frontier
        print(f"frontier law: L(C) = {f.coefficient:.4g} C^{f.exponent:.4f} + {f.offset:.4f}")
    print(f"loss-curve law fitted for {len(fit.curves)} model size(s)")
    if fit.tasks:
        print(f"task laws on {fit.tasks['runs']} runs of suite {fit.tasks['suite']}: GPT-4's pass-rate law "
              f"{'fitted' if fit.tasks['capability'] else 'not fitted'} ({fit.tasks.get('solved_problems', 0)} of "
              f"{fit.tasks['problems']} problems solved by every run), two-step law "
              f"{'fitted' if fit.tasks['two_step'] else 'not fitted'}")
    for note in fit.notes:
        print(f"note: {note}")
    if args.target_flops and (line := agreement_at(fit, args.target_flops)):
        print(line)
    print(f"wrote {args.out}")


def cmd_predict(args) -> None:
    from ..scaling.fit import ScalingFit, agreement_at

    fit = ScalingFit.load(args.fit)
    if args.config is not None or args.overrides:
        from ..scaling.forecast import forecast_for
        from ..training.config import load_config

        f = forecast_for(fit, load_config(args.config, args.overrides), args.fit)
        final = f["final"]
        print(f"N {f['params']:.4g} (non-embedding), D {f['tokens']:.4g} tokens, {f['flops']:.4g} FLOPs: loss "
              f"{final['loss']:.4f}, 80% interval [{final['lo']:.4f}, {final['hi']:.4f}] ({final['method']})"
              + (f"; the whole curve from the {f['curve_from']}" if f["curve_law"] else
                 "; no curve (the ladder did not run this model size)"))
        for method in ("approach3", "frontier"):
            if method in final and method != final["method"]:
                m = final[method]
                print(f"{method}: {m['loss']:.4f} [{m['lo']:.4f}, {m['hi']:.4f}]")
        return
    if args.params and args.tokens:
        loss, i = fit.loss(args.params, args.tokens)
        print(f"N {args.params:.4g}, D {args.tokens:.4g}: loss {loss:.4f}, 80% interval [{i.p10:.4f}, {i.p90:.4f}]")
        return
    if not args.flops:
        raise SystemExit("keel: error: give --flops C, or --params N --tokens D, or --config CONFIG [--set ...]")
    opt = fit.optimum(args.flops)
    a3 = opt["approach3"]
    loss, i = a3["loss"]
    print(f"at {args.flops:.4g} FLOPs (C = 6ND): compute-optimal N {a3['params']:.4g}, D {a3['tokens']:.4g} "
          f"(approach 3), loss {loss:.4f}, 80% interval [{i.p10:.4f}, {i.p90:.4f}]")
    if "approach2" in opt:
        print(f"approach 2: N* {opt['approach2']['params']:.4g}, D* {opt['approach2']['tokens']:.4g}")
    if "frontier" in opt:
        f = opt["frontier"]
        print(f"frontier law: loss {f['loss']:.4f}, 80% interval [{f['lo']:.4f}, {f['hi']:.4f}]"
              + (" (its exponent from published fits)" if fit.frontier_exponent_published else ""))
    if line := agreement_at(fit, args.flops):
        print(line)
    if fit.tasks:
        print(tasks_line(fit.tasks, args.flops))


def tasks_line(tasks_fit: dict, flops: float) -> str:
    from ..scaling.tasks_fit import predict_tasks

    t = predict_tasks(tasks_fit, flops)
    shown = {"answer NLL": t["answer_nll"], "pass rate": t["pass_rate"], "pass rate on solved problems": t["solved_pass_rate"]}
    return "tasks: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items() if v is not None)


def cmd_check(args) -> None:
    from ..scaling.fit import ScalingFit
    from ..scaling.forecast import compare, forecast_for, task_lines
    from ..training.config import load_config
    from ..training.record import read_record
    from pathlib import Path

    record = read_record(args.run)
    cfg = load_config(Path(args.run) / "config.yaml")
    result = compare(forecast_for(ScalingFit.load(args.fit), cfg, args.fit), record)
    for row in result["curve"]:
        print(f"step {row['step']:>6}: predicted {row['predicted']:.4f} [{row['lo']:.4f}, {row['hi']:.4f}], observed "
              f"{row['observed']:.4f} ({100 * row['error']:+.2f}%{'' if row['inside'] else ', OUTSIDE'})")
    f = result["final"]
    print(f"final: predicted {f['predicted']:.4f} [{f['lo']:.4f}, {f['hi']:.4f}], observed {f['observed']:.4f} "
          f"({100 * f['error']:+.2f}%, {'inside' if f['inside'] else 'OUTSIDE'} the 80% interval)"
          + (f"; worst eval {100 * result['worst_curve_error']:.2f}% off, {result['curve_inside']} of "
             f"{len(result['curve'])} evals inside their intervals" if result["curve"] else ""))
    for line in task_lines(result):
        print(f"tasks, {line}")


def cmd_report(args) -> None:
    from ..scaling.fit import ScalingFit
    from ..scaling.report import write_report

    paths = write_report(ScalingFit.load(args.fit), args.out, runs=args.runs, target_flops=args.target_flops,
                         check=args.check)
    print("wrote " + ", ".join(map(str, paths)))


def add_scale_parser(sub) -> None:
    scale = sub.add_parser("scale", help="plan and run a ladder of small runs, fit scaling laws, predict the big run")
    verbs = scale.add_subparsers(dest="scale_command", required=True, metavar="ACTION")

    p = verbs.add_parser("plan", help="write an IsoFLOP ladder (and a held-out check run) for a base config")
    p.add_argument("--base", help="base config (YAML); model sizes, steps, batch and LR are set per run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the base config for every run (repeatable)")
    p.add_argument("--budgets", required=True, metavar="LOW:HIGH:COUNT",
                   help="compute budgets in training FLOPs, e.g. 1e11:1e12:4 (>= 3 over >= one decade)")
    p.add_argument("--sizes", type=int, default=5, help="model sizes per budget, around the expected optimum")
    p.add_argument("--size-step", type=float, default=2.0, help="ratio between neighbouring sizes (default 2)")
    p.add_argument("--tokens-per-param", type=float, default=20.0,
                   help="where the sizes centre: the expected compute-optimal tokens per parameter (Chinchilla: 20)")
    p.add_argument("--target-flops", type=float, help="the big run's budget, for the forecast")
    p.add_argument("--check-factor", type=float, default=10.0,
                   help="a held-out check run at this multiple of the largest budget (0: none)")
    p.add_argument("--eval-sequences", type=int, default=512,
                   help="held-out sequences every run is scored on (default 512; fewer are faster and noisier)")
    p.add_argument("--tasks", metavar="heldout|FILE",
                   help="score a capability suite at the end of every run (train.tasks): heldout = next-line "
                        "completion from the held-out split, or a JSONL file of prompt/answer lines")
    p.add_argument("--output-dir", default="runs/ladder", help="where the runs go (default runs/ladder)")
    p.add_argument("--name", default="ladder", help="prefix of the runs' names")
    p.add_argument("-o", "--out", default="ladder.yaml", help="the ladder file to write (default ladder.yaml)")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("run", help="run a ladder's unfinished runs, several at once, each supervised")
    p.add_argument("ladder", help="a ladder file from keel scale plan")
    p.add_argument("--check", action="store_true", help="also run the held-out check run")
    p.add_argument("--parallel", type=int, metavar="K", help="runs at once (default: one per CPU locally)")
    p.add_argument("--address", help="Ray cluster to run on (default: an embedded Ray on this machine)")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("fit", help="fit the scaling laws to finished runs; writes fit.json")
    p.add_argument("runs", nargs="+", help="run directories, a folder of runs, a ladder file, or a CSV with "
                                           "columns params, tokens, loss (and optional flops, budget)")
    p.add_argument("-o", "--out", default="fit.json", help="where to write the fit (default fit.json)")
    p.add_argument("--replicates", type=int, default=200, help="bootstrap refits for the intervals")
    p.add_argument("--target-flops", type=float, help="also say whether the methods agree at this budget")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_fit)

    p = verbs.add_parser("predict", help="the loss (with its interval) and the compute-optimal N, D")
    p.add_argument("fit", help="fit.json from keel scale fit")
    p.add_argument("--flops", type=float, help="a compute budget: optimal N, D and the loss there")
    p.add_argument("--params", type=float, help="non-embedding parameters N (with --tokens)")
    p.add_argument("--tokens", type=float, help="training tokens D (with --params)")
    p.add_argument("--config", help="a run's config: N, D and FLOPs taken from it (with --set)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_predict)

    p = verbs.add_parser("check", help="a finished run against what the fit predicted for it")
    p.add_argument("run", help="the run directory (with record.json and config.yaml)")
    p.add_argument("fit", help="fit.json from keel scale fit")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_check)

    p = verbs.add_parser("report", help="PNG plots and a CSV of the runs and the fits")
    p.add_argument("fit", help="fit.json from keel scale fit")
    p.add_argument("-o", "--out", default="scaling-report", help="output folder (default scaling-report)")
    p.add_argument("--runs", nargs="*", default=[], help="run directories or a ladder, for the observed curves")
    p.add_argument("--check", help="the held-out run, drawn beside its prediction")
    p.add_argument("--target-flops", type=float, help="extend the frontier plot to this budget")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=cmd_report)

