"""Assemble ``docs/RESULTS.md`` from the generated fragments (no figure is typed by hand).

    python benchmarks/make_results.py

Reads ``docs/results/speed.md`` (``python benchmarks/speed.py``), ``docs/results/reproduce_cpu.md``
(``python benchmarks/reproduce_cpu.py``), ``docs/results/resnet_cpu.md``
(``python benchmarks/resnet_cpu.py``), ``docs/results/accumulate_memory.md``
(``python benchmarks/accumulate_memory.py``), ``docs/results/verifier_overhead.md``
(``python benchmarks/verifier_overhead.py``), ``docs/results/cifar_end_to_end.md``
(``python benchmarks/cifar_end_to_end.py``), ``docs/results/tanh_crown.md`` and
``docs/results/tanh_crown_narrow.md`` (``python benchmarks/tanh_crown_cost.py``),
``docs/results/crown_speed.md`` (``python benchmarks/crown_speed.py``) and the written discussions
``docs/results/notes.md``,
``resnet_cpu_notes.md``, ``resnet_crown.md``, ``verifier_overhead_notes.md``,
``cifar_end_to_end_notes.md``, ``tanh_crown_notes.md`` and ``crown_speed_notes.md`` (which quote only
figures from those files or the commands they name), and writes ``docs/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HEADER = """# Results: speed and the CPU-scale reproduction

Everything below is written by commands (each table names its command in an HTML comment above it);
rerun them to regenerate this page:

```bash
python benchmarks/speed.py                                   # → docs/results/speed.{json,md}
python benchmarks/speed.py --no-malloc-tuning --only steps_cnn7,steps_cnn3,ibp_engine \\
    --out docs/results/no-malloc-tuning                      # the same without ccdist_plugin.malloc
python benchmarks/speed.py --only allocator --out docs/results/allocator   # its effect, fresh processes
python benchmarks/reproduce_cpu.py --out runs/repro-cpu --workers 2 --main-betas 5,1 --seeds 5 \\
    --bab-seeds 5 --bab-teacher    # → docs/results/reproduce_cpu.*, docs/img/ (published run: in stages,
                                   #   listed in benchmarks/README.md)
python benchmarks/attack_cost.py --repeats 15                # → docs/results/attack_cost.* (issue 17's cost)
python benchmarks/reproduce_cpu.py --protocol paper-cpu --workers 2   # → docs/results/paper_cpu.* (in
                                   #   stages, listed in benchmarks/README.md; not run yet)
python benchmarks/resnet_cpu.py --workers 2                 # → docs/results/resnet_cpu.* (issue 16's
                                   #   PreActResNet18 comparison; the reading: resnet_cpu_notes.md)
python benchmarks/speed.py --only resnet --repeats 3 --threads 1 --out docs/results/resnet
python benchmarks/resnet_crown_cost.py ...                   # → docs/results/resnet_crown/ (full CROWN's
                                   #   cost and certified accuracy on PreActResNet18; resnet_crown.md)
python benchmarks/accumulate_memory.py                       # → docs/results/accumulate_memory.*
python benchmarks/verifier_overhead.py --points 12 --timeout 10 --rounds 2 --cifar-root DIR \\
                                   # → docs/results/verifier_overhead.* (issue 23: ccdist verify's cost)
python benchmarks/cifar_end_to_end.py --checkpoint runs/e2e-cnn3/checkpoint.pt --points 200 --shards 4 \\
    --timeout 10                   # → docs/results/cifar_end_to_end.* (issue 23: pre-filter + α,β-CROWN
                                   #   against α,β-CROWN alone; the reading: cifar_end_to_end_notes.md)
python benchmarks/cifar_end_to_end.py --checkpoint runs/e2e-cnn3/checkpoint.pt --points 200 --shards 4 \
    --timeout 10 --alpha-crown --out docs/results/cifar_end_to_end_alpha_final.json
                                   # the same with --alpha-crown (final slopes) in the pre-filter; the
                                   #   4-epoch network's runs: --checkpoint runs/e2e-cnn3-4epochs/...
                                   #   --out docs/results/cifar_end_to_end{,_alpha_final}_4epochs.json
python benchmarks/cifar_end_to_end.py --checkpoint runs/e2e-cnn3/checkpoint.pt --points 100 --shards 2 \
    --timeout 10 --alpha-crown all --out docs/results/cifar_end_to_end_alpha.json
                                   # and with every layer's slopes (about 20× the time of the rest)
python benchmarks/crown_speed.py --channels 16,16,32,32,32 --width 128 --points 4 --rss \\
    --out docs/results/crown_speed_narrow.json             # native full CROWN vs auto_LiRPA's, then
python benchmarks/crown_speed.py --channels 64,64,128,128,128 --width 512 --points 1 \\
    --out docs/results/crown_speed_paper.json              # the paper's CNN-7, and the table:
python benchmarks/crown_speed.py --table docs/results/crown_speed_narrow.json \\
    docs/results/crown_speed_paper.json > docs/results/crown_speed.md
python benchmarks/tanh_crown_cost.py --channels 4,4,8,8,8 --width 32 --points 2 --out docs/results
                                   # → docs/results/tanh_crown.* (native full CROWN through tanh)
python benchmarks/tanh_crown_cost.py --channels 16,16,32,32,32 --width 128 --points 1 \\
    --auto-lirpa-timeout 1200 --auto-lirpa-memory-mib 8192 --out docs/results --name tanh_crown_narrow
                                   # → docs/results/tanh_crown_narrow.* (the narrow tanh CNN-7)
python benchmarks/make_results.py                            # → docs/RESULTS.md (this page)
```

What each benchmark measures, and the protocol, is in [benchmarks/README.md](../benchmarks/README.md).
Assembled {date} UTC.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args(argv)
    docs = Path(args.docs)
    parts = [HEADER.replace("{date}", time.strftime("%Y-%m-%d %H:%M", time.gmtime()))]
    for title, name in (
        ("## Findings", "notes.md"),
        ("## Speed: ratios measured side by side", "speed.md"),
        ("## Science at CPU scale", "reproduce_cpu.md"),
        ("## CC-Dist vs CC-IBP closer to the paper's protocol (pre-registered)", "paper_cpu_plan.md"),
        ("### Cost of the paper's training attack, and of the whole protocol", "attack_cost.md"),
        ("### Results", "paper_cpu.md"),
        ("## PreActResNet18 at CPU scale: CC-IBP vs CC-Dist (appendix E.8, Table 11b)", "resnet_cpu.md"),
        ("### Reading", "resnet_cpu_notes.md"),
        ("### Full CROWN on PreActResNet18 (Table 11b's verifier)", "resnet_crown.md"),
        ("## Speed: PreActResNet18", "resnet/speed.md"),
        ("## Speed without the allocator setting (`--no-malloc-tuning`)", "no-malloc-tuning/speed.md"),
        ("## The allocator setting, in alternated fresh processes", "allocator/speed.md"),
        ("## Gradient accumulation", "accumulate_memory.md"),
        ("## `ccdist verify` against one α,β-CROWN process over the csv", "verifier_overhead.md"),
        ("### Reading", "verifier_overhead_notes.md"),
        (
            "## End to end on CIFAR-10: the pre-filter + α,β-CROWN against α,β-CROWN alone",
            "cifar_end_to_end.md",
        ),
        ("### Reading", "cifar_end_to_end_notes.md"),
        (
            "### The same with α-CROWN (the final slopes, the default of `--alpha-crown`) in the pre-filter",
            "cifar_end_to_end_alpha_final.md",
        ),
        ("### Reading", "cifar_end_to_end_alpha_final_notes.md"),
        ("#### The 4-epoch network without α-CROWN", "cifar_end_to_end_4epochs.md"),
        (
            "#### The 4-epoch network with α-CROWN (the final slopes)",
            "cifar_end_to_end_alpha_final_4epochs.md",
        ),
        ("### The same with α-CROWN (every layer's slopes) in the pre-filter", "cifar_end_to_end_alpha.md"),
        ("### Reading", "cifar_end_to_end_alpha_notes.md"),
        ("## Full CROWN: native (patches form) against auto_LiRPA", "crown_speed.md"),
        ("### Reading", "crown_speed_notes.md"),
        (
            "## Full CROWN through tanh: native against auto_LiRPA (appendix E.8's CNN-7, narrowed)",
            "tanh_crown.md",
        ),
        ("### The narrow tanh CNN-7 (channels 16,16,32,32,32, width 128)", "tanh_crown_narrow.md"),
        ("### Reading", "tanh_crown_notes.md"),
    ):
        path = docs / "results" / name
        if "/" in name and not path.is_file():
            continue  # optional extra speed runs
        body = path.read_text() if path.is_file() else f"_not generated yet: {path} is missing_\n"
        parts.append(f"{title}\n\n{body}")
    (docs / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {docs / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
