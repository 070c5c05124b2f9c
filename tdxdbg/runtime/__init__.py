"""The step machinery: world state, tasks, scheduling, recording and time travel.

Knows nothing of TDX or KVM: higher layers give it generators that yield Steps.
"""

from tdxdbg.runtime.frame import Frame, StackEntry
from tdxdbg.runtime.runtime import Runtime, StopReason
from tdxdbg.runtime.scheduler import Policy, Scheduler
from tdxdbg.runtime.step import Step, StepKind
from tdxdbg.runtime.task import Task, TaskState
from tdxdbg.runtime.timeline import Timeline
from tdxdbg.runtime.world import MISSING, World

__all__ = [
    "MISSING",
    "Frame",
    "Policy",
    "Runtime",
    "Scheduler",
    "StackEntry",
    "Step",
    "StepKind",
    "StopReason",
    "Task",
    "TaskState",
    "Timeline",
    "World",
]
