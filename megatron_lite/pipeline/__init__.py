"""Pipeline parallelism: schedules as action lists (``schedules``), a simulator that checks and
times them (``simulate``), point-to-point messages (``p2p``) and the one executor that runs any
schedule on a rank (``executor``)."""
