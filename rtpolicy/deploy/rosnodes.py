"""Running a deploy node as a program: its own rclpy context, a single-threaded executor, clean Ctrl-C.

Single-threaded on purpose: inference runs in the node's own worker thread, every callback is short,
and rclpy 7.1's MultiThreadedExecutor busy-spins a core while it waits (starving the control timer
on a 2-core machine).

rclpy's default SIGINT handler shuts the context down before our code runs, so nothing could be
published afterwards. Here SIGINT (and SIGTERM, which launch sends after SIGINT) raise
KeyboardInterrupt instead; a lifecycle node is then shut down through its lifecycle (the policy node
publishes a hold command) before the context goes.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions


EXIT_DEADLINE_S = 3.0  # after SIGINT/SIGTERM the process is gone within this, even if shutdown hangs


def _interrupt(signum, frame) -> None:
    # the first signal starts an orderly shutdown (hold published first); later ones must not interrupt it,
    # and a shutdown stuck behind a long inference call is cut off at the deadline
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    deadline = threading.Timer(EXIT_DEADLINE_S, os._exit, (0,))
    deadline.daemon = True  # a clean exit before the deadline does not wait for it
    deadline.start()
    raise KeyboardInterrupt(f"signal {signum}")


def _exit_if_inference_running() -> None:
    """A policy call still running on the inference thread (it was told to stop and the hold is out) would be
    torn down by interpreter finalization mid-call (std::terminate, SIGABRT): end the process now, exit 0."""
    if any(t.name == "rtpolicy-inference" and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def spin_node(factory: Callable[[Context], Node], ros_args: list[str], lifecycle_autostart: bool = False) -> int:
    """Create the node in a fresh context, optionally configure + activate it, spin until interrupted.

    Returns the exit code: 0 after an interrupt, 1 when an autostart transition fails.
    """
    context = Context()
    rclpy.init(args=["rtpolicy", *ros_args], context=context, signal_handler_options=SignalHandlerOptions.NO)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    node: Node | None = None
    executor: SingleThreadedExecutor | None = None
    interrupted = False
    try:
        node = factory(context)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        if lifecycle_autostart and isinstance(node, LifecycleNode):
            for name, trigger in (("configure", node.trigger_configure), ("activate", node.trigger_activate)):
                if trigger() != TransitionCallbackReturn.SUCCESS:
                    node.get_logger().error(f"autostart: {name} failed (reason above); exiting")
                    return 1
        executor.spin()
        return 0
    except KeyboardInterrupt:
        interrupted = True
        if node is not None:
            node.get_logger().info("interrupted: shutting down")
        return 0
    finally:
        if node is not None:
            if isinstance(node, LifecycleNode) and context.ok():
                node.trigger_shutdown()
            node.destroy_node()
        if executor is not None:
            executor.shutdown()
        rclpy.try_shutdown(context=context)
        if not interrupted:  # after a signal the process is ending: a second one stays ignored (restoring Python's
            for sig, handler in previous.items():  # handler would let it kill the exit with -SIGINT)
                signal.signal(sig, handler)
        _exit_if_inference_running()
