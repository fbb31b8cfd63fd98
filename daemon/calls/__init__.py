"""Calls: one call's life on the switch (``sequence``) and the apps it queues on A (``appqueue``), when
calls start (``dispatcher``), every write of a call's row and timeline plus the queries calls are read
through (``records``), and how a call is shown to clients (``view``)."""
