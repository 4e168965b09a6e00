"""The shared harness: contenders, one subprocess per measurement, interleaved repeats, medians, ratios.

Each measurement is `python -m bench.harness SPEC_JSON` in a fresh process, so its peak RSS
(VmHWM) is that contender's alone. The parent runs the contenders round-robin, rotating the
order each repeat, so slow phases of a shared machine hit every contender alike; ratios are taken per
repeat (neighbours in time) and their median reported, next to the ratio of the medians.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench.models import REPO_ROOT, work_dir

RESULT_MARK = "BENCH_RESULT "
QKVO = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Contender:
    name: str
    adapter: str  # sdlora | peft | lycoris
    network: str = "lora"  # lora | locon
    cache: bool = False  # peers only: precomputed latents and text states (informative)
    target_modules: tuple[str, ...] | None = None  # sdlora only: restrict to these module names
    label: str = ""
    proposed: bool = False  # sdlora only: run from the tree with bench/proposals/*.patch applied
    compile: bool = False  # sdlora only: train.compile (minutes of compiling in the warm-up steps)


CONTENDERS = {c.name: c for c in (
    Contender("sdlora", "sdlora", "lora", target_modules=QKVO, label="sdlora LoRA (q,k,v,out)"),
    Contender("diffusers-peft", "peft", "lora", label="diffusers recipe + peft LoRA (q,k,v,out)"),
    Contender("diffusers-peft-cached", "peft", "lora", cache=True,
              label="same, latents + text precomputed (info)"),
    Contender("sdlora-locon", "sdlora", "locon", label="sdlora LoCon"),
    Contender("lycoris-locon", "lycoris", "locon", label="LyCORIS LoCon on the recipe loop"),
    Contender("sdlora-compiled", "sdlora", "lora", target_modules=QKVO, compile=True,
              label="sdlora LoRA (q,k,v,out), train.compile"),
    Contender("sdlora-proposed", "sdlora", "lora", target_modules=QKVO, proposed=True,
              label="sdlora LoRA with bench/proposals applied"),
    Contender("sdlora-locon-proposed", "sdlora", "locon", proposed=True,
              label="sdlora LoCon with bench/proposals applied"),
)}


@dataclass(frozen=True)
class Pair:
    ours: str
    peer: str
    label: str
    targets: dict = field(default_factory=dict)  # metric -> max ratio


PAIRS = (
    Pair("sdlora", "diffusers-peft", "LoRA vs diffusers+peft", {"step_time": 0.9, "peak_rss": 1.0}),
    Pair("sdlora-locon", "lycoris-locon", "LoCon vs LyCORIS", {"peak_rss": 1.0}),
    Pair("sdlora", "diffusers-peft-cached", "LoRA vs recipe with caches (adapter + loop only)", {}),
    Pair("sdlora-compiled", "diffusers-peft", "LoRA with train.compile vs diffusers+peft", {"step_time": 0.9}),
    Pair("sdlora-compiled", "sdlora", "train.compile's own effect", {}),
    Pair("sdlora-proposed", "diffusers-peft", "LoRA with the proposals vs diffusers+peft",
         {"step_time": 0.9, "peak_rss": 1.0}),
    Pair("sdlora-locon-proposed", "lycoris-locon", "LoCon with the proposals vs LyCORIS", {"peak_rss": 1.0}),
    Pair("sdlora-proposed", "sdlora", "the proposals' own effect", {}),
    Pair("sdlora-locon-proposed", "sdlora-locon", "the proposals' own effect (LoCon)", {}),
)


# --- the worker (one contender, one process) ------------------------------------------------------


def build_contender(spec: dict):
    contender = CONTENDERS[spec["contender"]]
    common = dict(resolution=spec["resolution"], batch_size=spec["batch_size"], rank=spec["rank"],
                  alpha=spec.get("alpha"), network=contender.network, conv_rank=spec["conv_rank"],
                  conv_alpha=spec.get("conv_alpha"), seed=spec["seed"], mixed_precision=spec["mixed_precision"])
    run_dir = Path(spec["workdir"]) / "runs" / f"{contender.name}-{os.getpid()}"
    if contender.adapter == "sdlora":
        from bench.ours import SdloraContender, bench_config

        train = {"compile": contender.compile, "gradient_checkpointing": spec.get("gradient_checkpointing", False)}
        cfg = bench_config(spec["model_dir"], spec["data_dir"], run_dir, epochs=1000,
                           target_modules=contender.target_modules, **common, extra={"train": train})
        return SdloraContender(cfg), run_dir
    from bench.peers import Recipe

    recipe = Recipe(spec["model_dir"], spec["data_dir"], adapter=contender.adapter, cache=contender.cache,
                    epochs=1000, workdir=run_dir, gradient_checkpointing=spec.get("gradient_checkpointing", False),
                    **common)
    return recipe, run_dir


def peak_rss_mib() -> dict:
    """Peak resident set of this process. VmHWM (/proc) is the one to use: on Linux, ru_maxrss also
    counts the parent's RSS at fork time (exec records the forked address space's high-water mark), so a
    child of a big parent reports the parent's peak. ru_maxrss is kept for reference."""
    out = {"ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    hwm = read_vmhwm_mib("self")
    if hwm is not None:
        out["vmhwm_mib"] = hwm
    out["peak_rss_mib"] = out.get("vmhwm_mib", out["ru_maxrss_mib"])
    return out


def read_vmhwm_mib(pid) -> float | None:
    return _proc_status_mib(pid, "VmHWM:")


def read_vmrss_mib(pid="self") -> float | None:
    return _proc_status_mib(pid, "VmRSS:")


def _proc_status_mib(pid, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def quiet_libraries() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def worker(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    quiet_libraries()
    cuda = torch.cuda.is_available() and spec.get("device", "cpu") == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    started = time.perf_counter()
    contender, run_dir = build_contender(spec)
    contender.setup()
    sync()
    setup_s = time.perf_counter() - started
    batches = contender.batches()
    times, cpu_times, losses, data_s = [], [], [], 0.0
    for index in range(spec["warmup"] + spec["steps"]):
        if index == spec["warmup"]:
            contender.breakdown.clear()
            data_s = 0.0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        begin, cpu_begin = time.perf_counter(), time.process_time()
        batch = next(batches)
        fetched = time.perf_counter()
        losses.append(contender.step(batch))
        sync()
        end = time.perf_counter()
        data_s += fetched - begin
        times.append(end - begin)
        cpu_times.append(time.process_time() - cpu_begin)
    measured, measured_cpu = times[spec["warmup"]:], cpu_times[spec["warmup"]:]
    steady_rss = read_vmrss_mib()  # what the run holds while training (the peak may be a load transient)
    export_started = time.perf_counter()
    exported = contender.export(run_dir / "export" / "adapter.safetensors")
    export_s = time.perf_counter() - export_started
    params = contender.trainable_params()
    file_bytes = exported.stat().st_size
    bytes_per_param = contender.export_bytes_per_param()
    breakdown = {k: v / spec["steps"] for k, v in contender.breakdown.items()}
    breakdown["data"] = data_s / spec["steps"]
    result = {
        "contender": spec["contender"], "setup_s": setup_s, "step_times_s": measured,
        "median_step_s": statistics.median(measured), "cpu_step_times_s": measured_cpu,
        "median_cpu_step_s": statistics.median(measured_cpu), "losses": losses, "breakdown_s": breakdown,
        "steady_rss_mib": steady_rss, "warmup_times_s": times[:spec["warmup"]],
        "adapted_modules": contender.adapted_modules(), "trainable_params": params,
        "export": {"bytes": file_bytes, "bytes_per_param": bytes_per_param,
                   "ratio_to_params_x_bytes": file_bytes / (params * bytes_per_param), "seconds": export_s},
        **peak_rss_mib(),
    }
    import trainer

    result["code"] = str(Path(trainer.__file__).resolve().parent.parent)  # which tree ran (proposed or not)
    if cuda:
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["cuda_device"] = torch.cuda.get_device_name()
    return result


def pair_worker(spec: dict) -> dict:
    """Both contenders of a pair in one process, their steps alternating (A B, B A, A B...): each ratio
    compares two steps taken within a second of each other, so the load of a shared machine, which drifts
    over seconds to minutes, cancels out. (Peak RSS comes from the single-contender processes.)"""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    quiet_libraries()
    names = spec["pair"]
    contenders, batches = {}, {}
    for name in names:
        contenders[name], _ = build_contender(dict(spec, contender=name))
        contenders[name].setup()
        batches[name] = contenders[name].batches()
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for index in range(spec["warmup"] + spec["steps"]):
        for name in (names if index % 2 == 0 else list(reversed(names))):
            begin, cpu_begin = time.perf_counter(), time.process_time()
            contenders[name].step(next(batches[name]))
            times[name].append(time.perf_counter() - begin)
            cpu[name].append(time.process_time() - cpu_begin)
    ours, peer = names
    keep = slice(spec["warmup"], None)
    ratios = [a / b for a, b in zip(times[ours][keep], times[peer][keep])]
    cpu_ratios = [a / b for a, b in zip(cpu[ours][keep], cpu[peer][keep])]
    return {"pair": names, "step_times_s": {n: t[keep] for n, t in times.items()},
            "cpu_step_times_s": {n: t[keep] for n, t in cpu.items()}, "ratios": ratios, "cpu_ratios": cpu_ratios,
            "median_ratio": statistics.median(ratios), "median_cpu_ratio": statistics.median(cpu_ratios)}


# --- the parent -----------------------------------------------------------------------------------


def child_env(threads: int | None, tree: str | None = None) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_VERBOSITY="error",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    first = [str(tree)] if tree else []
    env["PYTHONPATH"] = os.pathsep.join([*first, str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_measured(cmd: list[str], threads: int | None, timeout: float, cwd: Path = REPO_ROOT,
                 tree: str | None = None) -> dict:
    """Run `cmd`; return its wall time, its output and its own peak RSS (reaped with os.wait4, whose
    rusage is that one child's, unlike RUSAGE_CHILDREN, a maximum over every child so far)."""
    started = time.perf_counter()
    log = work_dir() / "logs"
    log.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.time_ns()}"
    out_path, err_path = log / f"{stamp}.out", log / f"{stamp}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(cmd, cwd=tree or cwd, env=child_env(threads, tree), stdout=out, stderr=err,
                                   text=True)
        deadline, hwm = started + timeout, None
        while True:
            # VmHWM only grows, so the last value read before the exit is the peak (bar the last 20 ms).
            seen = read_vmhwm_mib(process.pid)
            hwm = seen if seen is not None and (hwm is None or seen > hwm) else hwm
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                os.wait4(process.pid, 0)
                raise RuntimeError(f"{' '.join(cmd[:5])}... ran past {timeout:.0f} s; see {err_path}")
            time.sleep(0.02)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    stdout, stderr = out_path.read_text(), err_path.read_text()
    out_path.unlink(missing_ok=True)
    err_path.unlink(missing_ok=True)
    return {"returncode": process.returncode, "wall_s": wall, "vmhwm_mib": hwm,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "ru_maxrss_mib": usage.ru_maxrss / 1024, "stdout": stdout, "stderr": stderr}


def run_worker(spec: dict, timeout: float = 600) -> dict:
    names = spec.get("pair") or [spec["contender"]]
    proposed = any(CONTENDERS[name].proposed for name in names)
    tree = spec.get("tree") if proposed else None
    if proposed and not tree:
        raise RuntimeError(f"{names} needs the proposed tree (bench.proposed); none was built")
    done = run_measured([sys.executable, "-m", "bench.harness", json.dumps(spec)], spec.get("threads"), timeout,
                        tree=tree)
    lines = [line for line in done["stdout"].splitlines() if line.startswith(RESULT_MARK)]
    if done["returncode"] != 0 or not lines:
        raise RuntimeError(f"worker {names} failed ({done['returncode']}):\n{done['stderr'][-3000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    result["process_wall_s"] = done["wall_s"]
    if "pair" not in spec:
        result["polled_vmhwm_mib"] = done["vmhwm_mib"]
    return result


def machine_info(threads: int | None) -> dict:
    import importlib.metadata as md

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "diffusers", "transformers", "peft", "lycoris-lora", "accelerate"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "threads_per_process": threads, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: dict[str, list[dict]], batch_size: int, pairs=PAIRS, paired: dict | None = None) -> dict:
    """Per contender medians, and per pair the ratios ours / peer: from the alternating in-process steps
    (`paired`, the headline when measured), per repeat of the separate processes, and of the medians."""
    contenders = {}
    for name, results in runs.items():
        step = median([r["median_step_s"] for r in results])
        pooled = median([t for r in results for t in r["step_times_s"]])
        keys = sorted({k for r in results for k in r["breakdown_s"]})
        contenders[name] = {
            "label": CONTENDERS[name].label if name in CONTENDERS else name,
            "repeats": len(results),
            "median_step_s": step,
            "pooled_median_step_s": pooled,
            "per_repeat_step_s": [r["median_step_s"] for r in results],
            "median_cpu_step_s": median([r["median_cpu_step_s"] for r in results]),
            "images_per_s": batch_size / step if step else None,
            "peak_rss_mib": median([r["peak_rss_mib"] for r in results]),
            "steady_rss_mib": median([r.get("steady_rss_mib") for r in results]),
            "setup_s": median([r["setup_s"] for r in results]),
            "breakdown_s": {k: median([r["breakdown_s"].get(k) for r in results]) for k in keys},
            "adapted_modules": results[0]["adapted_modules"],
            "trainable_params": results[0]["trainable_params"],
            "export": results[0]["export"],
            "loss_finite": all(math.isfinite(loss) for r in results for loss in r["losses"]),
        }
        if "cuda_peak_mib" in results[0]:
            contenders[name]["cuda_peak_mib"] = median([r["cuda_peak_mib"] for r in results])
    ratios = []
    for pair in pairs:
        if pair.ours not in runs or pair.peer not in runs:
            continue
        ours, peer = runs[pair.ours], runs[pair.peer]
        per_repeat = [a["median_step_s"] / b["median_step_s"] for a, b in zip(ours, peer)]
        a, b = contenders[pair.ours], contenders[pair.peer]
        alternating = (paired or {}).get((pair.ours, pair.peer), [])
        row = {
            "ours": pair.ours, "peer": pair.peer, "label": pair.label,
            "same_adapted_modules": a["adapted_modules"] == b["adapted_modules"],
            "same_trainable_params": a["trainable_params"] == b["trainable_params"],
            "step_time": median(per_repeat),
            "step_time_source": "separate processes, median of per-repeat ratios",
            "step_time_per_repeat": per_repeat,
            "step_time_of_medians": a["median_step_s"] / b["median_step_s"],
            "cpu_step_time": median([x["median_cpu_step_s"] / y["median_cpu_step_s"] for x, y in zip(ours, peer)]),
            "images_per_s": a["images_per_s"] / b["images_per_s"],
            "peak_rss": a["peak_rss_mib"] / b["peak_rss_mib"],
            "steady_rss": a["steady_rss_mib"] / b["steady_rss_mib"] if a["steady_rss_mib"] and b["steady_rss_mib"]
            else None,
        }
        if alternating:
            row["step_time_separate"] = row["step_time"]
            row["step_time"] = median([x for r in alternating for x in r["ratios"]])
            row["cpu_step_time_separate"] = row["cpu_step_time"]
            row["cpu_step_time"] = median([x for r in alternating for x in r["cpu_ratios"]])
            row["step_time_source"] = "alternating steps in one process, median of per-step ratios"
            row["step_time_alternating_per_repeat"] = [r["median_ratio"] for r in alternating]
            row["images_per_s"] = 1 / row["step_time"]
        if "cuda_peak_mib" in a and "cuda_peak_mib" in b:
            row["cuda_peak_memory"] = a["cuda_peak_mib"] / b["cuda_peak_mib"]
        row["targets"] = {metric: {"max": limit, "met": row[metric] <= limit} for metric, limit in pair.targets.items()}
        ratios.append(row)
    # Two sdlora trees cannot alternate in one process; their step ratio is derived through a common peer
    # ((new / peer) / (old / peer), both alternating), far steadier than the separate runs' ratio.
    alternated = {(r["ours"], r["peer"]): r for r in ratios if "step_time_alternating_per_repeat" in r}
    for row in ratios:
        if row["ours"] == row["peer"] + "-proposed" and (row["ours"], row["peer"]) not in alternated:
            for (ours, peer), via in alternated.items():
                if ours == row["ours"] and (row["peer"], peer) in alternated:
                    base = alternated[(row["peer"], peer)]
                    row["step_time_separate"] = row["step_time"]
                    row["step_time"] = via["step_time"] / base["step_time"]
                    row["cpu_step_time"] = via["cpu_step_time"] / base["cpu_step_time"]
                    row["images_per_s"] = 1 / row["step_time"]
                    row["step_time_source"] = f"derived: ({ours} / {peer}) / ({row['peer']} / {peer}), both alternating"
                    break
    return {"contenders": contenders, "ratios": ratios}


def interleaved_order(groups: list[list[str]], repeat: int) -> list[str]:
    """ABBA: a pair's members run next to each other, the first on even repeats goes last on odd ones,
    and the groups swap places too, so a slow spell of the shared machine lands on both sides."""
    blocks = [group if repeat % 2 == 0 else list(reversed(group)) for group in groups]
    if repeat % 2:
        blocks.reverse()
    return [name for block in blocks for name in block]


def run_interleaved(groups: list[list[str]], base_spec: dict, repeats: int, log=print, timeout: float = 600) -> dict:
    runs: dict[str, list[dict]] = {name: [] for group in groups for name in group}
    for repeat in range(repeats):
        for name in interleaved_order(groups, repeat):
            spec = dict(base_spec, contender=name)
            result = run_worker(spec, timeout=timeout)
            runs[name].append(result)
            log(f"  [{repeat + 1}/{repeats}] {name:24s} {result['median_step_s']:.4f} s/step "
                f"(cpu {result['median_cpu_step_s']:.4f})  rss {result['peak_rss_mib']:.0f} MiB  "
                f"setup {result['setup_s']:.1f} s  (process {result['process_wall_s']:.1f} s)", flush=True)
    # Each contender has one result per repeat, so zip() in summarize pairs neighbours in time.
    return runs


def run_alternating(pairs, base_spec: dict, repeats: int, log=print, timeout: float = 600) -> dict:
    """{(ours, peer): [pair_worker results]} for every pair, `repeats` times, the first mover alternating."""
    results: dict = {}
    for repeat in range(repeats):
        for ours, peer in pairs:
            names = [ours, peer] if repeat % 2 == 0 else [peer, ours]
            result = run_worker(dict(base_spec, pair=names), timeout=timeout)
            if names[0] != ours:  # keep every ratio as ours / peer
                result["ratios"] = [1 / r for r in result["ratios"]]
                result["cpu_ratios"] = [1 / r for r in result["cpu_ratios"]]
                result["median_ratio"] = statistics.median(result["ratios"])
                result["median_cpu_ratio"] = statistics.median(result["cpu_ratios"])
            results.setdefault((ours, peer), []).append(result)
            log(f"  [{repeat + 1}/{repeats}] {ours} / {peer}: {result['median_ratio']:.3f} "
                f"(cpu {result['median_cpu_ratio']:.3f}) over {len(result['ratios'])} alternating steps", flush=True)
    return results


def write_json(data: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def finish(result: dict, out: Path, report, started: float) -> int:
    """The end of every bench command: stamp load and duration, write the JSON, print the report."""
    result.setdefault("machine", {})["load_average_at_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - started
    write_json(result, out)
    print()
    print(report(result))
    print(f"\n{result['wall_s']:.0f} s; wrote {out}")
    return 0


def load_proposals() -> tuple[Path | None, dict]:
    """--proposed: the tree with bench/proposals/*.patch applied (None when none applies) and each patch's status."""
    from bench.proposed import proposed_tree

    tree, status = proposed_tree()
    print("proposals: " + (", ".join(f"{k} {v}" for k, v in status.items()) or "none in bench/proposals"))
    return tree, status


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    print(RESULT_MARK + json.dumps(pair_worker(job) if "pair" in job else worker(job)), flush=True)
