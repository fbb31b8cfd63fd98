"""Calls: one call's life on the switch (``sequence``), when calls start (``dispatcher``), what is
written about them (``journal``) and how a call is shown to clients (``view``)."""
