"""The pass/fail tally of the scripts run under mpiexec (layer_mpi_check.py,
hf_moe_mpi_check.py): each rank counts its checks, printing the failures;
finish() prints "<name>: N passed, M failed" over all ranks on rank 0 and
exits nonzero on any failure."""

import sys

from mpi4py import MPI


class Tally:
    def __init__(self, comm=MPI.COMM_WORLD):
        self.comm, self.rank = comm, comm.Get_rank()
        self.passed, self.failed = 0, 0

    def check(self, name, ok, detail=""):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            print(f"[rank {self.rank}] FAIL {name} {detail}", flush=True)

    def finish(self, name):
        passed, failed = self.comm.allreduce(self.passed), self.comm.allreduce(self.failed)
        if self.rank == 0:
            print(f"{name}: {passed} passed, {failed} failed", flush=True)
        sys.exit(1 if failed else 0)
