"""Commands beyond `migrate` and `stub-openai`: worker, api, enqueue, status, demo."""

from __future__ import annotations

import argparse
from collections.abc import Callable

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

REGISTER: list[Register] = []
