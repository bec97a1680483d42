"""Stand-in for google.colab.drive: colabtools' google/colab/drive.py checks and messages, with a folder for Drive.

mount() returns at once if `<mountpoint>/My Drive` is a folder (the real module's own test for "mounted"), refuses a
mountpoint that holds files, and otherwise makes `My Drive` and `MyDrive` there. flush_and_unmount() empties the
mountpoint again, as the real one leaves it (what was written is in Drive, no longer on the VM).
"""

import os
import shutil

__all__ = ["flush_and_unmount", "mount"]


def flush_and_unmount(timeout_ms=24 * 60 * 60 * 1000):
    mountpoint = os.environ.get("SWEEPER_FAKE_DRIVE_MOUNTED", "")
    if not mountpoint:
        print("Drive not mounted, so nothing to flush and unmount.")
        return
    for name in os.listdir(mountpoint):
        shutil.rmtree(os.path.join(mountpoint, name))
    del os.environ["SWEEPER_FAKE_DRIVE_MOUNTED"]


def mount(mountpoint, force_remount=False, timeout_ms=60000, use_metadata_server=False):
    if " " in mountpoint:
        raise ValueError("Mountpoint must not contain a space.")
    mountpoint = os.path.expanduser(mountpoint)
    if not force_remount and os.path.isdir(os.path.join(mountpoint, "My Drive")):
        print('Drive already mounted at {mnt}; to attempt to forcibly remount, '
              'call drive.mount("{mnt}", force_remount=True).'.format(mnt=mountpoint))
        return
    if os.path.isdir(mountpoint) and os.listdir(mountpoint):
        raise ValueError("Mountpoint must not already contain files")
    os.makedirs(os.path.join(mountpoint, "My Drive"))
    os.makedirs(os.path.join(mountpoint, "MyDrive"))
    os.environ["SWEEPER_FAKE_DRIVE_MOUNTED"] = mountpoint
    print("Mounted at {}".format(mountpoint))
