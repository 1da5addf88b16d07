import socket

# Not service.server: it loads our v2 stubs, whose package 'inference' clashes with tritonclient.grpc's
# own copy in one process's protobuf pool (the server process never imports tritonclient).
from service.net import bind
from service.settings import Settings


def test_listening_socket_turns_nagle_off_and_binds_loopback():
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY on accepted sockets only then
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def test_settings_default_to_loopback_and_read_the_environment(monkeypatch):
    assert Settings().host == "127.0.0.1"
    monkeypatch.setenv("SAMPSERVE_HTTP_PORT", "9100")
    monkeypatch.setenv("SAMPSERVE_REQUEST_TIMEOUT_S", "2.5")
    settings = Settings()
    assert settings.http_port == 9100 and settings.request_timeout_s == 2.5


def test_a_missing_repository_fails_at_start_with_its_path(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "no-such-repo"
    done = subprocess.run([sys.executable, "-m", "service", "--repo", str(missing), "--http-port", "0",
                           "--grpc-port", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert str(missing) in done.stderr and "not a directory" in done.stderr


def test_a_port_in_use_is_one_line_naming_the_setting_before_any_model_loads(tmp_path):
    import subprocess
    import sys

    taken = bind("127.0.0.1", 0)
    taken.listen()
    port = taken.getsockname()[1]
    try:
        for flag, what, setting in (("--http-port", "REST", "HTTP_PORT"), ("--grpc-port", "gRPC", "GRPC_PORT")):
            ports = {"--http-port": "0", "--grpc-port": "0", flag: str(port)}
            done = subprocess.run([sys.executable, "-m", "service", "--repo", str(tmp_path),
                                   *[x for pair in ports.items() for x in pair]],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 2, done.stderr
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            assert len(lines) == 1, done.stderr
            assert f"{what} port {port} on 127.0.0.1 is in use" in lines[0] and f"SAMPSERVE_{setting}" in lines[0]
    finally:
        taken.close()
