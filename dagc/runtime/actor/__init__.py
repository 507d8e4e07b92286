"""What runs inside an actor: the calls the driver makes through ``__ray_call__``, the loop."""
