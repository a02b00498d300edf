"""Launch the policy node and the simulated Meta-World robot together.

    ros2 launch rtpolicy/deploy/launch/policy.launch.py bundle:=bundles/reach-v3 task:=reach-v3
        [params_file:=rtpolicy/conf/deploy/metaworld.yaml] [step_on_command:=true] [sim:=false]

Both nodes run the ``rtpolicy`` console script (``rtpolicy deploy`` / ``rtpolicy sim``), found on PATH
(activate the environment rtpolicy is installed in). The policy node configures and activates itself
(its ``autostart``); ``sim:=false`` starts the policy node alone, for a real robot.
"""

from pathlib import Path

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

DEFAULT_PARAMS = str(Path(__file__).resolve().parents[2] / "conf" / "deploy" / "metaworld.yaml")


def generate_launch_description() -> LaunchDescription:
    args = [
        DeclareLaunchArgument("bundle", description="policy bundle folder"),
        DeclareLaunchArgument("task", default_value="reach-v3", description="Meta-World task of the simulated robot"),
        DeclareLaunchArgument("params_file", default_value=DEFAULT_PARAMS, description="ROS 2 parameter file for both nodes"),
        DeclareLaunchArgument("step_on_command", default_value="true", description="lock-step simulation"),
        DeclareLaunchArgument("sim", default_value="true", description="start the simulated robot"),
    ]
    policy = Node(
        executable="rtpolicy", arguments=["deploy"], name="rtpolicy", output="screen", emulate_tty=True,
        parameters=[LaunchConfiguration("params_file"), {"bundle": LaunchConfiguration("bundle")}],
    )
    sim = Node(
        executable="rtpolicy", arguments=["sim"], name="rtpolicy_sim", output="screen", emulate_tty=True,
        condition=IfCondition(LaunchConfiguration("sim")),
        parameters=[LaunchConfiguration("params_file"),
                    {"task": LaunchConfiguration("task"), "step_on_command": LaunchConfiguration("step_on_command")}],
    )
    return LaunchDescription([*args, sim, policy])
