"""A job that fails: a few lines of output, a traceback, exit status 3."""

import sys

print("loading weights 1/2", flush=True)
print("loading weights 2/2", flush=True)
sys.stderr.write(f"started with {' '.join(sys.argv[1:])}\n")  # a job that echoes its own command line
sys.stderr.write("RuntimeError: CUDA out of memory while capturing graph 7\n")
sys.exit(3)
