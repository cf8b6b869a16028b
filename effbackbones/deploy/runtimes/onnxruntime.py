"""ONNX Runtime (CPU execution provider): float32 sessions; no export stand-ins (the default
graph is what it runs best)."""

#: how messages name it
NAME = 'onnxruntime'
#: nothing to substitute: a file tuned for onnxruntime is the plain graph
SUBSTITUTIONS = {}
#: its CPU provider has no bfloat16 execution
PRECISIONS = ('float32',)


def session_options(threads=None):
    """onnxruntime's options of a session: all graph optimisations, ``threads`` intra-op
    threads and one inter-op thread."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return opts


class Session:
    """One ONNX file in onnxruntime on its CPU provider (:func:`session_options`)."""

    def __init__(self, path, threads=None, precision='float32'):
        import onnxruntime as ort
        self._sess = ort.InferenceSession(path, session_options(threads),
                                          providers=['CPUExecutionProvider'])
        self._input_name = self._sess.get_inputs()[0].name

    def run(self, array):
        return self._sess.run(None, {self._input_name: array})


__all__ = ['NAME', 'SUBSTITUTIONS', 'PRECISIONS', 'session_options', 'Session']
