"""Deployment: export, runtime, safety, ROS 2 node."""
