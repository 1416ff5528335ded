"""Event codes to the NSP: a small output interface with one backend per kind of hardware.

Every backend sends one 16-bit code at a time (:mod:`closedloop.data.event_codes` owns the
layout); the presenter calls :meth:`send` from the window's call-on-flip, so a stimulus code
leaves right after the onset flip. Backends (``[events] output`` in rig.toml):

- ``none``: nothing is sent (codes are still counted);
- ``serial`` (pyserial): each code as 2 bytes, high byte first (``byte_order = "big"``, the
  default) or low byte first; for USB-serial boxes and microcontrollers that set the NSP's
  16 digital input lines and strobe;
- ``parallel`` (psychopy.parallel): the low byte on the first port's 8 data lines, the high byte
  on the second's;
- ``labjack`` (labjack-ljm; needs LabJack's LJM library): the 16 bits on FIO0-7 (low byte) and
  EIO0-7 (high byte) of a T4/T7/T8, written at once through ``FIO_EIO_STATE``;
- ``nidaq`` (nidaqmx; needs NI-DAQmx): the 16 bits on ``nidaq_lines`` as one channel.

A backend whose Python package or vendor driver is missing raises :class:`EventOutputError`
saying which, at open; nothing is faked.
"""

from __future__ import annotations

import os
import sys

from closedloop.core.validation import check_integer, check_option

__all__ = ["EventOutput", "EventOutputError", "open_event_output", "encode_code", "OUTPUTS"]

OUTPUTS = ("none", "serial", "parallel", "labjack", "nidaq")


class EventOutputError(ValueError):
    """An event output could not be opened: its message names the missing package, driver or device
    (a ``ValueError``, so the CLI reports it in one line like any other bad setting)."""


def encode_code(code: int, byte_order: str = "big") -> bytes:
    """The 2 bytes of a 16-bit event ``code`` (0..65535) on a serial line, ``byte_order`` "big" or "little"."""
    check_option("byte_order", byte_order, ("big", "little"))
    return check_integer("code", code, minimum=0, maximum=0xFFFF).to_bytes(2, byte_order)


class EventOutput:
    """The ``none`` output and the base of every backend: ``send(code)``, ``close()``, ``description``.

    ``n_sent`` counts the codes sent since open.
    """

    description = "none (no event codes are sent)"

    def __init__(self) -> None:
        self.n_sent = 0

    def send(self, code: int) -> None:
        """Send one 16-bit code (0..65535) now."""
        check_integer("code", code, minimum=0, maximum=0xFFFF)
        self._write(code)
        self.n_sent += 1

    def _write(self, code: int) -> None:
        pass

    def close(self) -> None:
        """Release the device."""


class _SerialOutput(EventOutput):
    def __init__(self, port: str, baudrate: int, byte_order: str) -> None:
        super().__init__()
        serial = _import("serial", "pyserial", "serial")
        try:
            self._port = serial.Serial(port, baudrate=baudrate, timeout=0, write_timeout=1.0)
        except (serial.SerialException, OSError, ValueError) as error:
            raise EventOutputError(f"[events] serial_port = {port!r}: cannot open it: {error}") from error
        self._byte_order = byte_order
        self.description = f"serial {port} at {baudrate} bit/s, 2 bytes per code, {byte_order}-endian"

    def _write(self, code: int) -> None:
        self._port.write(encode_code(code, self._byte_order))
        self._port.flush()

    def close(self) -> None:
        self._port.close()


class _ParallelOutput(EventOutput):
    def __init__(self, ports: list[str]) -> None:
        super().__init__()
        parallel = _import("psychopy.parallel", "psychopy", "parallel")
        try:
            self._ports = [parallel.ParallelPort(address=_port_address(port)) for port in ports]
        except Exception as error:  # the driver raises anything from ImportError to OSError
            raise EventOutputError(
                f"[events] parallel_ports = {ports}: cannot open them: {type(error).__name__}: {error}; "
                "on Linux the user needs access to /dev/parport* (group lp) and the ppdev module"
            ) from error
        self.description = f"parallel ports {ports[0]} (low byte) and {ports[1]} (high byte)"

    def _write(self, code: int) -> None:
        low, high = self._ports
        high.setData(code >> 8)
        low.setData(code & 0xFF)


class _LabJackOutput(EventOutput):
    def __init__(self, identifier: str) -> None:
        super().__init__()
        try:
            from labjack import ljm
        except ImportError as error:
            raise EventOutputError("[events] output = \"labjack\" needs labjack-ljm: pip install 'closedloop[labjack]' "
                                   f"and LabJack's LJM library ({error})") from error
        except Exception as error:  # ljm loads the vendor library at import
            raise EventOutputError(f"[events] output = \"labjack\": LabJack's LJM library is missing or broken: {error}; "
                                   "install LJM from labjack.com") from error
        try:
            self._handle = ljm.openS("ANY", "ANY", identifier)
        except Exception as error:
            raise EventOutputError(f"[events] labjack_identifier = {identifier!r}: cannot open the LabJack: {error}") from error
        self._ljm = ljm
        self.description = f"LabJack {identifier} FIO0-7 (low byte) + EIO0-7 (high byte)"

    def _write(self, code: int) -> None:
        self._ljm.eWriteName(self._handle, "FIO_EIO_STATE", code)

    def close(self) -> None:
        self._ljm.close(self._handle)


class _NidaqOutput(EventOutput):
    def __init__(self, lines: str) -> None:
        super().__init__()
        nidaqmx = _import("nidaqmx", "nidaq", "nidaq")
        from nidaqmx.constants import LineGrouping

        try:
            self._task = nidaqmx.Task()
            self._task.do_channels.add_do_chan(lines, line_grouping=LineGrouping.CHAN_FOR_ALL_LINES)
        except Exception as error:  # DaqNotFoundError without the NI-DAQmx driver, DaqError for a bad device
            raise EventOutputError(f"[events] nidaq_lines = {lines!r}: cannot open them: {type(error).__name__}: {error}; "
                                   "install NI-DAQmx from ni.com and check the device name in NI MAX") from error
        self.description = f"NI-DAQmx {lines}"

    def _write(self, code: int) -> None:
        self._task.write(code)

    def close(self) -> None:
        self._task.close()


def _import(module: str, package: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise EventOutputError(f"this event output needs the Python package {package}: "
                               f"pip install 'closedloop[{extra}]' ({error})") from error


def _port_address(port: str):
    """A parallel port as psychopy wants it: a device path on Linux, an integer address (e.g. 0x378) elsewhere."""
    if port.startswith("/dev/") or os.sep in port:
        return port
    try:
        return int(port, 0)
    except ValueError:
        raise EventOutputError(f"parallel port {port!r}: give a device (/dev/parport0) or an address (0x378)") from None


def open_event_output(events) -> EventOutput:
    """The event output that rig.toml's ``[events]`` section (``events``) asks for, opened.

    Raises :class:`EventOutputError` naming the missing package, driver or device.
    """
    check_option("[events] output", events.output, OUTPUTS)
    if events.output == "serial":
        return _SerialOutput(events.serial_port, events.baudrate, events.byte_order)
    if events.output == "parallel":
        if sys.platform == "darwin":
            raise EventOutputError("[events] output = \"parallel\": macOS has no parallel port driver; use serial")
        return _ParallelOutput(events.parallel_ports)
    if events.output == "labjack":
        return _LabJackOutput(events.labjack_identifier)
    if events.output == "nidaq":
        return _NidaqOutput(events.nidaq_lines)
    return EventOutput()
