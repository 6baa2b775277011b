"""The peer's S3: Flink's own S3 file system (flink-s3-fs-hadoop, which tests/env/install-flink.sh
puts in the PyFlink distribution's plugins/s3-fs-hadoop/) pointed at the S3 server the Weir side
uses, from the standard AWS environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION, and WEIR_TEST_BUCKET for the bucket (as tests/env/up.sh
writes them). Shared by flink_savepoint.py and flink_keyed_count.py; runs in the python of the
PyFlink venv, and the file-system helpers go through the PyFlink JVM (Flink's FileSystem
classes: what they see is what the jobs see).
"""

import os

ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "WEIR_TEST_BUCKET")


class S3ConfigError(Exception):
    pass


class S3:
    """The bucket of the environment and a prefix of this run's own in it (`uri`)."""

    def __init__(self, prefix, staging_dir):
        env = {k: os.environ.get(k, "") for k in ENV}
        missing = [k for k, v in env.items() if not v]
        if missing:
            raise S3ConfigError(f"S3 storage needs {', '.join(missing)} in the environment "
                                "(source the env.sh that tests/env/up.sh writes)")
        self.endpoint = env["AWS_ENDPOINT_URL"]
        self.bucket = env["WEIR_TEST_BUCKET"]
        self.region = env["AWS_REGION"]
        self.uri = f"s3://{self.bucket}/{prefix}"
        self.describe = f"{self.endpoint}/{self.bucket}"
        self._key, self._secret = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        self.staging_dir = staging_dir
        os.makedirs(staging_dir, exist_ok=True)

    def flink_conf(self):
        """Flink's settings for its S3 file system (the plugin hands s3.* to Hadoop's S3A as
        fs.s3a.*). Path-style requests (http://host:port/bucket/key), as Garage and most servers
        of one's own need. The region signs the requests: Garage refuses any other than its own
        ("garage"), and without fs.s3a.endpoint.region the AWS SDK signs for us-east-1 at an
        endpoint like 127.0.0.1. What Flink writes is buffered in staging_dir
        (fs.s3a.buffer.dir) and uploaded in parts."""
        return {
            "s3.endpoint": self.endpoint,
            "s3.endpoint.region": self.region,
            "s3.path.style.access": "true",
            "s3.access-key": self._key,
            "s3.secret-key": self._secret,
            "s3.buffer.dir": self.staging_dir,
        }


def apply(conf, settings):
    """Sets each key of the dict `settings` on a pyflink Configuration."""
    for k, v in settings.items():
        conf.set_string(k, v)


def initialize_file_systems(settings):
    """Initializes Flink's file systems in the PyFlink JVM with `settings` and the plugins of the
    distribution, as a cluster's entry point does. The local mini-cluster a TableEnvironment
    starts runs in this JVM, and its jobs reach S3 through these (static) file systems."""
    from pyflink.java_gateway import get_gateway

    jvm = get_gateway().jvm
    conf = jvm.org.apache.flink.configuration.GlobalConfiguration.loadConfiguration()
    for k, v in settings.items():
        conf.setString(k, v)
    plugins = jvm.org.apache.flink.core.plugin.PluginUtils.createPluginManagerFromRootFolder(conf)
    jvm.org.apache.flink.core.fs.FileSystem.initialize(conf, plugins)


def _path(uri):
    from pyflink.java_gateway import get_gateway

    p = get_gateway().jvm.org.apache.flink.core.fs.Path(uri)
    return p, p.getFileSystem()


def du(uri):
    """(files, bytes) under uri (a directory or a file), listed through Flink's file system."""
    path, fs = _path(uri)
    files = total = 0
    stack = [path]
    while stack:
        for st in fs.listStatus(stack.pop()) or []:
            if st.isDir():
                stack.append(st.getPath())
            else:
                files += 1
                total += st.getLen()
    return files, total


def delete(uri):
    """Removes everything under uri (through Flink's file system); True if something was there."""
    path, fs = _path(uri)
    return bool(fs.delete(path, True))


def remove_run(uri, log):
    """Deletes a run's objects under `uri` and logs what went; a failed clean-up is logged,
    never raised, so that it cannot hide the run's result."""
    try:
        files, size = du(uri)
        delete(uri)
        log(f"removed {uri} ({files} objects, {size} bytes)")
    except Exception as e:  # noqa: BLE001 -- a failed clean-up must not hide the result
        log(f"could not remove {uri}: {e}")
