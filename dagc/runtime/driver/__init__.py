"""What runs in the driver.

compiled.py    CompiledDag: composed of the parts below; inspection over plain data
session.py     Session: the token, control, ends, handles; starting and stopping loops
runtime.py     DriverRuntime: the rt the driver's generated module binds; argument checks
plans.py       Layout and what each actor is told (plain data, no Ray)
executions.py  Executions (submit, fetch, results, locks, teardown); dagref.py: DagRef
profiling.py   Profiler and Profile
calls.py       actor calls with dagc errors; the probe round
"""
