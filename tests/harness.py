"""The tests' name for testbed/loopback.py: the real parts (sshd, rigs, sessions) that
the tests and the bench both run rvgahp against. `import harness` gives that module
itself, so the tests and the bench share one copy and one state."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from testbed import loopback

sys.modules[__name__] = loopback
