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

import signal
from typing import Callable

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def spin_node(factory: Callable[[Context], Node], ros_args: list[str], lifecycle_autostart: bool = False) -> int:
    """Create the node in a fresh context, optionally configure + activate it, spin until interrupted.

    Returns the exit code: 0 after an interrupt, 1 when an autostart transition fails.
    """
    context = Context()
    rclpy.init(args=["rtpolicy", *ros_args], context=context, signal_handler_options=SignalHandlerOptions.NO)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    node: Node | None = None
    executor: SingleThreadedExecutor | None = None
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
        signal.signal(signal.SIGTERM, previous)
