"""What several test modules share: config builders, tiny models, servers and subprocess workers.

Test modules import from here (or take the fixtures tests/conftest.py builds on it), never from
one another, so that moving or deleting one test file breaks no other.
"""

from pathlib import Path

# The folder itself: the worker scripts in it are launched by path (python FILE, torchrun FILE).
HELPERS_DIR = Path(__file__).resolve().parent
