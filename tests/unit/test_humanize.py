from node.humanize import duration, size


def test_duration_units() -> None:
    assert [duration(x) for x in (None, -3, 0.85, 12.34, 245, 7800, 3 * 86400 + 4 * 3600)] == [
        "-", "0 ms", "850 ms", "12.3 s", "4 min 05 s", "2 h 10 min", "3 d 04 h"]
    assert duration(None, none="") == ""


def test_size_in_powers_of_1000() -> None:
    assert [size(x) for x in (None, 512, 3_400_000, 2.5e9, 7e15)] == ["-", "512 B", "3.4 MB", "2.5 GB", "7000.0 TB"]
    assert size(None, none="") == ""
