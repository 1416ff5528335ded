"""The display computer: ``closedloop rig serve`` / ``rig check`` with the PsychoPy presenter.

``config`` (rig.toml), ``events`` (event codes to the NSP), ``fixation`` (gaze sources and the
fixation monitor), ``screen`` (the PsychoPy window and its thread), ``presenter`` (frame-locked
RSVP), ``serve`` (the two programs). PsychoPy is imported only when a window opens (the ``rig``
extra: ``pip install 'closedloop[rig]'``). See docs/rig.md.
"""
