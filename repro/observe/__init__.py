"""Evidence from jobs vdiag did not launch (`vdiag watch -- COMMAND`, `vdiag attach PID`).

- `tree`: the job's process tree as it grows (psutil), each process's environment from /proc;
- `identity`: who each process is (rank from RANK/LOCAL_RANK/WORLD_SIZE, vLLM's process titles, NVML);
- `progress`: tqdm-style N/M bars and new lines in the job's output;
- `job`: the command started in its own process group, its output passed through and scanned;
- `monitor`: the stall rule (no progress for --stall-s, stragglers outside every known wait keep it
  watching) and the activity split into busy and idle processes;
- `collect`: the collectors (py-spy, cuda-gdb, core dump, environment) pointed at those processes;
- `session`: watch and attach from start to report (through `repro.diagnose`; the verdict paragraph of
  an observed job is `repro.observed_verdict`'s).
"""
