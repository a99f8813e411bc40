/*
 * layerfs-overlay's launcher: the client half of the fork server (forkserver_client.py) in C.
 *
 * Every container start of rootless podman, and every `mount -t fuse.layerfs-overlay`, runs
 * layerfs-overlay once. The Python client has to start an interpreter first, 12-13 ms here
 * warm and 20-35 ms with cold caches, before it can hand the mount to the fork server, which
 * then needs 3-4 ms to do it. This program speaks the same protocol from a 1 ms start.
 *
 * It does only the common case: a background mount handed to a server of this installation.
 * For anything else (a foreground or help call, LAYERFS_FORKSERVER=0, no server up, one that
 * declines or retired, input it cannot encode) it execs the Python entry point with the same
 * arguments, which decides as always: it asks the server again, runs the command itself, and
 * starts a server where none is up. So the launcher can make a mount faster, never different.
 *
 * Built by tools/setup with the installation baked in: LAYERFS_INTERPRETER (the realpath of
 * the virtualenv's python, as `installation()` names it), LAYERFS_PACKAGE (the package dir)
 * and LAYERFS_FALLBACK (the Python entry point to exec).
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#if !defined(LAYERFS_INTERPRETER) || !defined(LAYERFS_PACKAGE) || !defined(LAYERFS_FALLBACK)
#error "build with -DLAYERFS_INTERPRETER=... -DLAYERFS_PACKAGE=... -DLAYERFS_FALLBACK=..."
#endif

#define PROTOCOL 1 /* forkserver_client.PROTOCOL: a test checks that both say the same */
#define PROGRAM "layerfs-overlay"
#define MAX_REPLY 4096

extern char **environ;

static char **original_argv;
static volatile pid_t child;

/* Run the Python entry point instead, with our arguments: it does what layerfs-overlay has
   always done. */
static _Noreturn void run_python(void)
{
	execv(LAYERFS_FALLBACK, original_argv);
	fprintf(stderr, "layerfs-overlay: cannot run %s: %s\n", LAYERFS_FALLBACK, strerror(errno));
	_exit(127);
}

static void trace(const char *socket_path, const char *what)
{
	const char *debug = getenv("LAYERFS_DEBUG");
	if (debug && strcmp(debug, "1") == 0)
		fprintf(stderr, "layerfs: fork server %s: %s (launcher)\n", socket_path, what);
}

/* ---------------------------------------------------------------- a growing byte buffer */

struct buffer {
	char *data;
	size_t len, cap;
};

static void put(struct buffer *b, const void *data, size_t len)
{
	if (b->len + len > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		while (cap < b->len + len)
			cap *= 2;
		char *grown = realloc(b->data, cap);
		if (!grown)
			run_python();
		b->data = grown;
		b->cap = cap;
	}
	memcpy(b->data + b->len, data, len);
	b->len += len;
}

/* ---------------------------------------------------------------- marshal, the few types used */

static void put_int32(struct buffer *b, char type, int32_t value)
{
	unsigned char le[5] = {(unsigned char)type, value & 0xff, (value >> 8) & 0xff,
			       (value >> 16) & 0xff, ((uint32_t)value >> 24) & 0xff};
	put(b, le, sizeof le);
}

/* Whether `s` is UTF-8 as Python decodes it strictly: no overlong forms, no surrogates,
   nothing past U+10FFFF. Anything else would reach Python as a surrogate escape, which only
   Python itself can encode the same way; the launcher leaves such input to it. */
static int valid_utf8(const unsigned char *s, size_t len)
{
	size_t i = 0;
	while (i < len) {
		unsigned char c = s[i];
		size_t n;
		uint32_t cp;
		if (c < 0x80) {
			i++;
			continue;
		} else if ((c & 0xe0) == 0xc0) {
			n = 1, cp = c & 0x1f;
		} else if ((c & 0xf0) == 0xe0) {
			n = 2, cp = c & 0x0f;
		} else if ((c & 0xf8) == 0xf0) {
			n = 3, cp = c & 0x07;
		} else {
			return 0;
		}
		if (i + n >= len) /* cut short */
			return 0;
		for (size_t k = 1; k <= n; k++) {
			if ((s[i + k] & 0xc0) != 0x80)
				return 0;
			cp = cp << 6 | (s[i + k] & 0x3f);
		}
		static const uint32_t smallest[] = {0, 0x80, 0x800, 0x10000};
		if (cp < smallest[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
			return 0;
		i += n + 1;
	}
	return 1;
}

/* A str; the caller checked that it is valid UTF-8. */
static void put_str(struct buffer *b, const char *s, size_t len)
{
	put_int32(b, 'u', (int32_t)len);
	put(b, s, len);
}

static void put_bytes(struct buffer *b, const char *s, size_t len)
{
	put_int32(b, 's', (int32_t)len);
	put(b, s, len);
}

/* ---------------------------------------------------------------- what installation() says */

static int python_variable(const char *entry)
{
	return strncmp(entry, "PYTHON", 6) == 0 || strncmp(entry, "LAYERFS_PURE=", 13) == 0;
}

static int by_bytes(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The contents of /proc/self/NAME, as installation() reads them ("" where it cannot). */
static void put_proc_self(struct buffer *b, const char *name)
{
	char path[64], chunk[4096];
	snprintf(path, sizeof path, "/proc/self/%s", name);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	ssize_t n;
	while ((n = read(fd, chunk, sizeof chunk)) > 0)
		put(b, chunk, (size_t)n);
	close(fd);
}

/* Python's os.environ keeps the first of two entries with one name; so do we. */
static int seen_before(char **env, size_t i)
{
	const char *eq = strchr(env[i], '=');
	size_t name_len = (size_t)(eq - env[i]);
	for (size_t j = 0; j < i; j++)
		if (strncmp(env[j], env[i], name_len + 1) == 0)
			return 1;
	return 0;
}

/* forkserver_client.installation(): interpreter, package, PYTHON* variables, login session
   and cgroup, joined by NULs. */
static void installation(struct buffer *b)
{
	size_t count = 0;
	for (char **e = environ; *e; e++)
		count++;
	const char **chosen = calloc(count + 1, sizeof *chosen);
	if (!chosen)
		run_python();
	size_t n = 0;
	for (size_t i = 0; i < count; i++)
		if (strchr(environ[i], '=') && python_variable(environ[i]) && !seen_before(environ, i))
			chosen[n++] = environ[i];
	qsort(chosen, n, sizeof *chosen, by_bytes);
	put(b, LAYERFS_INTERPRETER, strlen(LAYERFS_INTERPRETER) + 1);
	put(b, LAYERFS_PACKAGE, strlen(LAYERFS_PACKAGE) + 1);
	for (size_t i = 0; i < n; i++)
		put(b, chosen[i], strlen(chosen[i]) + 1);
	free(chosen);
	put_proc_self(b, "loginuid");
	put(b, "", 1);
	put_proc_self(b, "sessionid");
	put(b, "", 1);
	put_proc_self(b, "cgroup");
}

/* zlib's crc32, which names the socket */
static uint32_t crc32(const unsigned char *data, size_t len)
{
	uint32_t crc = 0xffffffffu;
	for (size_t i = 0; i < len; i++) {
		crc ^= data[i];
		for (int k = 0; k < 8; k++)
			crc = crc >> 1 ^ (0xedb88320u & -(crc & 1));
	}
	return ~crc;
}

/* ---------------------------------------------------------------- where the server is */

/* os.path.join(a, b) for a relative b */
static int join(char *out, size_t size, const char *a, const char *b)
{
	size_t len = strlen(a);
	const char *sep = len && a[len - 1] == '/' ? "" : "/";
	return snprintf(out, size, "%s%s%s", a, sep, b) < (int)size;
}

static int runtime_dir(char *out, size_t size)
{
	const char *explicit = getenv("LAYERFS_RUNTIME_DIR");
	if (explicit && *explicit)
		return snprintf(out, size, "%s", explicit) < (int)size;
	const char *xdg = getenv("XDG_RUNTIME_DIR");
	if (xdg && *xdg)
		return join(out, size, xdg, "layerfs");
	if (geteuid() == 0)
		return snprintf(out, size, "/run/layerfs") < (int)size;
	return snprintf(out, size, "/tmp/layerfs-%u", (unsigned)geteuid()) < (int)size;
}

/* A real directory of ours that nobody else may write to: whoever could put a socket there
   would see our commands and our terminal. */
static int private_dir(const char *path)
{
	struct stat st;
	return lstat(path, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == geteuid() &&
	       !(st.st_mode & 022);
}

/* ---------------------------------------------------------------- the command */

static int runs_here(int argc, char **argv)
{
	static const char *const here[] = {"-f", "-d", "-h", "--help", "-V", "--version"};
	const char *enabled = getenv("LAYERFS_FORKSERVER");
	if (enabled && strcmp(enabled, "0") == 0)
		return 1;
	for (int i = 1; i < argc; i++)
		for (size_t k = 0; k < sizeof here / sizeof *here; k++)
			if (strcmp(argv[i], here[k]) == 0)
				return 1;
	return 0;
}

/* marshal.dumps((PROTOCOL, installation(), program, argv, dict(os.environb), umask)) */
static void request(struct buffer *b, const struct buffer *inst, int argc, char **argv,
		    mode_t umask_now)
{
	if (!valid_utf8((unsigned char *)inst->data, inst->len))
		run_python();
	put_int32(b, '(', 6);
	put_int32(b, 'i', PROTOCOL);
	put_str(b, inst->data, inst->len);
	put_str(b, PROGRAM, strlen(PROGRAM));
	put_int32(b, '[', argc);
	for (int i = 0; i < argc; i++) {
		size_t len = strlen(argv[i]);
		if (!valid_utf8((unsigned char *)argv[i], len))
			run_python();
		put_str(b, argv[i], len);
	}
	put(b, "{", 1);
	for (size_t i = 0; environ[i]; i++) {
		const char *eq = strchr(environ[i], '=');
		if (!eq || seen_before(environ, i))
			continue;
		put_bytes(b, environ[i], (size_t)(eq - environ[i]));
		put_bytes(b, eq + 1, strlen(eq + 1));
	}
	put(b, "0", 1);
	put_int32(b, 'i', (int32_t)umask_now);
}

static void forward(int signum)
{
	if (child > 0)
		kill(child, signum);
}

static ssize_t receive(int sock, char *reply)
{
	ssize_t n;
	do
		n = recv(sock, reply, MAX_REPLY, 0);
	while (n < 0 && errno == EINTR);
	return n;
}

int main(int argc, char **argv)
{
	original_argv = argv;
	if (argc < 1 || runs_here(argc, argv))
		run_python();

	char dir[PATH_MAX], name[32], path[PATH_MAX];
	if (!runtime_dir(dir, sizeof dir) || !private_dir(dir))
		run_python();
	for (int fd = 0; fd <= 2; fd++)
		if (fcntl(fd, F_GETFD) < 0) /* closed: our socket would take its number */
			run_python();

	struct buffer inst = {0};
	installation(&inst);
	snprintf(name, sizeof name, "forkserver-%08x.sock",
		 crc32((unsigned char *)inst.data, inst.len));
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (!join(path, sizeof path, dir, name) || strlen(path) >= sizeof addr.sun_path)
		run_python();
	memcpy(addr.sun_path, path, strlen(path) + 1);

	int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0)
		run_python(); /* none is up: Python starts one */
	struct ucred peer;
	socklen_t peer_len = sizeof peer;
	if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &peer, &peer_len) < 0 ||
	    peer.uid != geteuid())
		run_python();

	mode_t umask_now = umask(022);
	umask(umask_now);
	struct buffer message = {0};
	request(&message, &inst, argc, argv, umask_now);
	free(inst.data);

	int fds[4] = {open(".", O_PATH | O_DIRECTORY | O_CLOEXEC), 0, 1, 2};
	if (fds[0] < 0)
		run_python();
	char control[CMSG_SPACE(sizeof fds)] = {0};
	struct iovec iov = {.iov_base = message.data, .iov_len = message.len};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
			     .msg_controllen = sizeof control};
	struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(sizeof fds);
	memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
	ssize_t sent;
	do
		sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (sent < 0 && errno == EINTR);
	close(fds[0]);
	free(message.data);
	if (sent < 0)
		run_python();

	char reply[MAX_REPLY];
	ssize_t n = receive(sock, reply);
	if (n < 5 || reply[0] != 'Y') {
		/* retired ("R"), declined ("N" and why) or gone before it forked: Python asks
		   again and does what the answer says */
		close(sock);
		trace(path, "not run here; running the Python entry point");
		run_python();
	}
	int32_t pid_be;
	memcpy(&pid_be, reply + 1, sizeof pid_be);
	child = (pid_t)(int32_t)ntohl((uint32_t)pid_be);

	struct sigaction relay = {.sa_handler = forward};
	sigemptyset(&relay.sa_mask);
	for (const int *s = (const int[]){SIGINT, SIGTERM, SIGHUP, SIGQUIT, 0}; *s; s++)
		sigaction(*s, &relay, NULL);
	n = receive(sock, reply);
	if (n < 5 || reply[0] != 'S') {
		fputs("layerfs: the fork server went away while running the command\n", stderr);
		return 1;
	}
	int32_t status_be;
	memcpy(&status_be, reply + 1, sizeof status_be);
	trace(path, "ran the command");
	return (int)(int32_t)ntohl((uint32_t)status_be);
}
