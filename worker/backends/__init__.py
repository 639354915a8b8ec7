"""The model servers a worker calls, one module per protocol behind one call interface.

`base.BackendClient` is what a protocol implements (torchserve.py, oip.py, openai.py);
`caller.Caller` is what the worker calls: it looks the task's backend up, and runs the attempts.
"""

from worker.backends.base import Answer, BackendClient, Request
from worker.backends.caller import Caller

__all__ = ["Answer", "BackendClient", "Caller", "Request"]
