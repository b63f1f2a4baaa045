"""Process supervision for launch.py: start, watch, restart and stop the cluster's processes."""
