"""rtpolicy: diffusion and VLA robot policies, from demonstrations to a real-time ROS 2 controller."""

__version__ = "0.1.0"
