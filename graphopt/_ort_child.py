"""Child-process probe: create ONNX Runtime sessions on an untrusted model and run it once.

Run as a script (``python _ort_child.py MODEL INPUTS.npz OUTPUTS.npz [MAX_BYTES]``), never
imported by graphopt itself: it imports only numpy and onnxruntime, so it starts fast, and a
native crash in session creation (measured: a legal model can segfault ORT's optimizer) kills
this process, not graphopt's. ``MAX_BYTES`` caps the process's address space (``RLIMIT_AS``)
before ONNX Runtime sees the model: a file whose constant folding or outputs would need
gigabytes fails to allocate here and exits non-zero, instead of exhausting the machine.
"""

import resource
import sys

import numpy as np
import onnxruntime as ort


def main(model_path: str, inputs_path: str, outputs_path: str) -> None:
    feeds = dict(np.load(inputs_path))
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(model_path, sess_options=options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = session.run(None, {n: feeds[n] for n in names})
    np.savez(outputs_path, *outputs)


if __name__ == "__main__":
    if len(sys.argv) > 4:
        limit = int(sys.argv[4])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    main(*sys.argv[1:4])
