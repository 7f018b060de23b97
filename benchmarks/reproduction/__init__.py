"""The stages of ``benchmarks/reproduce_cpu.py`` (the CPU-scale reproduction), one module each, lowest first:

- ``plan``: ε, the validation splits, the ``paper-cpu`` protocol's sizes and stages, run names, the choice
  of α and β on validation;
- ``jobs``: one run (``Job``) and its TrainConfig, the student's initial network;
- ``runfolders``: the settings a run records and when a later invocation reuses it; the lock of a run;
- ``measure``: the metrics of a trained network (the package's pre-filter) and the paper's diagnostics;
- ``train``: stages ``teacher``, ``select-alpha``, ``select-beta``, ``students``: train and evaluate one run;
- ``bab``: stage ``bab``, α,β-CROWN on the first test points of a run;
- ``paper_cpu_report``: stage ``report`` of ``--protocol paper-cpu`` (the pre-registered paired analysis);
- ``paper_cpu``: ``--protocol paper-cpu``, its stages in order (``--until``);
- ``issue9_report``, ``issue9``: the issue-9 protocol (the default) and its report.

The script itself reads the command line and runs one protocol.
"""
