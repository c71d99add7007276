"""shared/redisconn.py: one round trip per call on the thread's own connection, replies in step
even after an error reply, a connection the server closed replaced on the spot, none shared with
another thread or a forked child."""
import os
import threading

import pytest
import redis

from shared.redisconn import Commands


@pytest.fixture
def commands(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.delete("rc:list", "rc:text")
    yield Commands(client)
    client.delete("rc:list", "rc:text")


def test_replies_come_back_in_order_of_the_commands(commands):
    assert commands.run([("RPUSH", "rc:list", "a", "b"), ("LRANGE", "rc:list", 0, -1), ("SET", "rc:text", "x"),
                         ("GET", "rc:text")]) == [2, [b"a", b"b"], b"OK", b"x"]
    assert commands("LLEN", "rc:list") == 2


def test_an_error_reply_is_raised_after_every_reply_is_read(commands):
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        commands.run([("SET", "rc:text", "x"), ("LPUSH", "rc:text", "y"), ("RPUSH", "rc:list", "after")])
    assert commands("LRANGE", "rc:list", 0, -1) == [b"after"]  # the command after the error ran
    assert commands("GET", "rc:text") == b"x"  # and the next reply is this command's, not a stray one


def test_a_connection_the_server_closed_is_replaced_and_the_commands_sent_again(commands, redis_url):
    first = commands("CLIENT", "ID")
    redis.Redis.from_url(redis_url).client_kill_filter(_id=first)
    assert commands("RPUSH", "rc:list", "once") == 1  # sent on a new connection, once
    assert commands("CLIENT", "ID") != first
    assert commands("LRANGE", "rc:list", 0, -1) == [b"once"]


def test_redis_out_of_reach_is_a_connection_error():
    nowhere = Commands(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1))
    with pytest.raises(redis.ConnectionError):
        nowhere("PING")


def test_each_thread_and_each_forked_child_has_a_connection_of_its_own(commands):
    mine = commands("CLIENT", "ID")
    assert commands("CLIENT", "ID") == mine  # kept between calls
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(commands("CLIENT", "ID")))
    thread.start()
    thread.join()
    assert theirs and theirs[0] != mine

    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its own connection, not the parent's socket
        try:
            os.write(write, str(commands("CLIENT", "ID")).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    child_id = int(os.read(read, 100))
    os.close(read)
    assert child_id not in (mine, theirs[0])
    assert commands("CLIENT", "ID") == mine  # the parent's connection is untouched
