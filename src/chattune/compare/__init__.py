"""``chattune compare``: the plan of one run per method (``command``), the worker that trains
and evaluates one of them in its own process (``worker``), and the report (``report``).
"""
