"""Training: the entry points, the run assembly, the loop and what they share.

Importing this package (which every training entry point does before torch loads) sets TORCH_CPP_LOG_LEVEL to
ERROR unless it is set: when one rank ends a job (a refusal, a full disk), torch's C++ layer on every other
rank logs a warning with a C++ stack for each call to the vanished rank's store. Those ranks end quietly
(`lillm.errors.JobEnding`); the rank that ended the job says why. Set TORCH_CPP_LOG_LEVEL=WARNING to see
torch's C++ warnings.
"""

import os

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
