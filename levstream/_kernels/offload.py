"""The compiled loop of the product worker (:mod:`levstream._offload`).

The loop never holds the GIL and never touches a Python object: it waits on a POSIX semaphore (glibc's
``sem_wait``, passed in as a ctypes function), reads a job slot (the addresses and shapes of the job's arrays,
written by the submitting thread before it posted the semaphore), computes the moment product of the job into the
job's output array with :func:`~levstream._kernels.lift.features_product` (the kernel the ingest helpers run, so the
product is the same bit for bit), and posts the slot's own semaphore.  ``sem_post`` and ``sem_wait`` order the
memory: what the submitter wrote before its post is seen after the worker's wait, and the product after the
slot's post is seen by whoever waited for it.
"""

from __future__ import annotations

import numba
from numba.core import types
from numba.extending import intrinsic

from .lift import features_product

#: The fields of a job slot (int64 each): the rows ``X`` (m, d) and values ``V`` (m, dv), both C-contiguous float64,
#: the feature pairs ``ia``/``ib`` (D int64 each), the lifted features per BLAS call, the output ``C`` (D, dv), and
#: two scratch arrays the submitter allocated: ``XT`` (d, m) and ``buf`` (block m floats).  The loop allocates
#: nothing, so nothing in it can fail.
X_ADDRESS, ROWS, WIDTH, V_ADDRESS, VALUE_DIM, IA_ADDRESS, IB_ADDRESS, FEATURES, BLOCK = range(9)
C_ADDRESS, XT_ADDRESS, BUF_ADDRESS = range(9, 12)
SLOT_FIELDS = 12
#: Bytes per semaphore in the semaphore array (glibc's ``sem_t`` is 32 bytes; 64 keeps each on its own cache line).
SEMAPHORE_BYTES = 64
#: ``control`` words: jobs taken so far (the worker's position in the queue), and the stop request.
TAKEN, STOP = 0, 1


def _pointer_at(dtype: types.Type) -> object:
    """An intrinsic that makes the ``dtype`` pointer at an integer address."""

    @intrinsic
    def pointer_at(typingctx, address):  # pragma: no cover - compiled
        sig = types.CPointer(dtype)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(dtype)))

        return sig, codegen

    return pointer_at


_float64_at = _pointer_at(types.float64)
_int64_at = _pointer_at(types.int64)


@numba.njit(nogil=True, cache=True)
def serve_products(
    control, queue, jobs, semaphores, dgemm, sem_wait, sem_post
):  # pragma: no cover - compiled
    """Serve jobs until a stop request: semaphore 0 of ``semaphores`` counts the jobs queued (slot numbers in
    ``queue``, a ring, in order), semaphore ``1 + s`` is posted when slot ``s``'s product is in its ``C``."""
    base = semaphores.ctypes.data
    taken = control[TAKEN]
    while True:
        while sem_wait(base) != 0:  # interrupted by a signal handler: wait again
            pass
        if control[STOP]:
            return taken
        slot = queue[taken % queue.shape[0]]
        taken += 1
        control[TAKEN] = taken
        job = jobs[slot]
        m, d, dv, D, block = job[ROWS], job[WIDTH], job[VALUE_DIM], job[FEATURES], job[BLOCK]
        X = numba.carray(_float64_at(job[X_ADDRESS]), (m, d))
        V = numba.carray(_float64_at(job[V_ADDRESS]), (m, dv))
        ia = numba.carray(_int64_at(job[IA_ADDRESS]), (D,))
        ib = numba.carray(_int64_at(job[IB_ADDRESS]), (D,))
        C = numba.carray(_float64_at(job[C_ADDRESS]), (D, dv))
        XT = numba.carray(_float64_at(job[XT_ADDRESS]), (d, m))
        buf = numba.carray(_float64_at(job[BUF_ADDRESS]), (block * m,))
        if D and dv and m:  # (its BLAS calls overwrite C)
            for j in range(m):
                for a in range(d):
                    XT[a, j] = X[j, a]
            features_product(XT, V, ia, ib, block, buf, C, dgemm)
        else:
            C[:, :] = 0.0
        sem_post(base + SEMAPHORE_BYTES * (1 + slot))
