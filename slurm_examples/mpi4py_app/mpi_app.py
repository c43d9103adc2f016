"""An mpi4py application with Flowcept: MPI is the application's; Flowcept is its guest."""

from mpi4py import MPI

from flowcept import Flowcept, FlowceptTask

comm = MPI.COMM_WORLD
with Flowcept(workflow_name="mpi4py-example"):
    with FlowceptTask(activity_id="allreduce", used={"rank": comm.rank, "size": comm.size}) as task:
        total = comm.allreduce(comm.rank, op=MPI.SUM)
        task.end(generated={"sum_of_ranks": total})
