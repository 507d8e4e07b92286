"""What runs inside an actor.

plan.py       what the driver sends: ActorPlan, PrepareSpec and the end records (frozen)
lifecycle.py  the calls the driver makes through __ray_call__: probe, start, stop, ...
prepared.py   the prepare round: a node's segments made, TCP writers listening
loop.py       ActorLoop: the generated module bound to the actor, run on a thread
"""
