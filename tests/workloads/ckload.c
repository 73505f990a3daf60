/*
 * ckload: workloads for the checkpoint/restore tests and benchmarks of runc-architect.
 * Built static by the test harness (tests/src/workload.rs) and put into the test image.
 *
 *   ckload tree STATEFILE
 *       A parent and a child joined by a pipe and a unix stream socket pair. Every 50 ms
 *       the parent sends the next number over both; the child checks that each stream
 *       carries exactly the next number and writes "N\n" to STATEFILE, or "BROKEN ..." and
 *       exits 1 when a stream skipped, repeated or lost data.
 *
 *   ckload heap MIB PORT
 *       Allocates MIB MiB, writes a pattern into every page, then serves TCP on PORT: each
 *       connection gets one line "sum SUM MIB MIB\n" where SUM is recomputed over the whole
 *       heap (so an answer after a restore proves the memory came back intact).
 *
 *   ckload echo PORT
 *       Serves TCP on PORT; every line received on a connection is answered with
 *       "pong N LINE\n", N counting the lines of that connection. Connections are served
 *       one at a time by forked children, so a connection outlives a checkpoint only if
 *       its established state is restored.
 *
 *   ckload lock FILE
 *       Takes an exclusive flock on FILE and holds it, writing a counter into it every
 *       100 ms.
 *
 *   ckload perf FILE
 *       Holds a perf event descriptor (which CRIU cannot dump) and writes a counter into
 *       FILE every 100 ms.
 *
 *   ckload hib PORT FLUSHFILE [perf]
 *       The hibernation suite's server: one process serving any number of connections on
 *       PORT with poll(). Every line "X" is answered "n TOTAL X", TOTAL counting the lines
 *       of all connections since the process started (state that must survive a wake). A
 *       line starting with "GET " is answered as HTTP (200, "ok", then close) and not
 *       counted. On SIGTERM it writes "total TOTAL" to FLUSHFILE, fsyncs and exits 0 (a
 *       graceful shutdown that must not lose anything). With "perf" it also holds a perf
 *       event descriptor, which CRIU cannot dump.
 *
 *   ckload pause
 *       What a pod's pause container does as the init of a shared pid namespace: sleeps,
 *       and reaps every child that is re-parented to it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/perf_event.h>
#include <sys/file.h>
#include <sys/syscall.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static void nap_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

static int read_full(int fd, void *buf, size_t len)
{
	char *p = buf;
	while (len) {
		ssize_t n = read(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static void write_state(const char *path, const char *text)
{
	char tmp[4096];
	snprintf(tmp, sizeof(tmp), "%s.tmp", path);
	FILE *f = fopen(tmp, "w");
	if (!f)
		die("open state");
	fputs(text, f);
	fclose(f);
	rename(tmp, path);
}

static int tree(const char *state)
{
	int p[2], s[2];
	if (pipe(p) < 0)
		die("pipe");
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, s) < 0)
		die("socketpair");
	pid_t child = fork();
	if (child < 0)
		die("fork");
	if (child == 0) {
		close(p[1]);
		close(s[0]);
		uint64_t want = 1;
		for (;;) {
			uint64_t a, b;
			char line[128];
			if (read_full(p[0], &a, sizeof(a)) || read_full(s[1], &b, sizeof(b))) {
				snprintf(line, sizeof(line), "BROKEN eof after %llu\n",
					 (unsigned long long)(want - 1));
				write_state(state, line);
				return 1;
			}
			if (a != want || b != want) {
				snprintf(line, sizeof(line), "BROKEN want %llu got %llu %llu\n",
					 (unsigned long long)want, (unsigned long long)a,
					 (unsigned long long)b);
				write_state(state, line);
				return 1;
			}
			snprintf(line, sizeof(line), "%llu\n", (unsigned long long)want);
			write_state(state, line);
			want++;
		}
	}
	close(p[0]);
	close(s[1]);
	signal(SIGPIPE, SIG_IGN);
	for (uint64_t n = 1;; n++) {
		if (write(p[1], &n, sizeof(n)) != sizeof(n) || write(s[0], &n, sizeof(n)) != sizeof(n))
			die("send");
		nap_ms(50);
	}
}

static int listen_on(int port)
{
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket");
	int one = 1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in a;
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t)port);
	a.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
		die("bind");
	if (listen(fd, 64) < 0)
		die("listen");
	return fd;
}

static uint64_t checksum(const unsigned char *heap, size_t len)
{
	uint64_t sum = 1469598103934665603ULL;
	for (size_t i = 0; i < len; i += 512)
		sum = (sum ^ heap[i]) * 1099511628211ULL;
	return sum;
}

_Noreturn static void heap(long mib, int port)
{
	size_t len = (size_t)mib << 20;
	unsigned char *h = malloc(len);
	if (!h)
		die("malloc");
	for (size_t i = 0; i < len; i += 512)
		h[i] = (unsigned char)(i / 512 * 31 + 7);
	int l = listen_on(port);
	signal(SIGPIPE, SIG_IGN);
	for (;;) {
		int c = accept(l, NULL, NULL);
		if (c < 0)
			continue;
		char line[128];
		int n = snprintf(line, sizeof(line), "sum %llu mib %ld\n",
				 (unsigned long long)checksum(h, len), mib);
		if (write(c, line, (size_t)n) < 0) {
			/* the client left: nothing to do */
		}
		close(c);
	}
}

_Noreturn static void echo(int port)
{
	int l = listen_on(port);
	signal(SIGCHLD, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	for (;;) {
		int c = accept(l, NULL, NULL);
		if (c < 0)
			continue;
		pid_t pid = fork();
		if (pid == 0) {
			close(l);
			FILE *in = fdopen(c, "r");
			char buf[512];
			unsigned long n = 0;
			while (in && fgets(buf, sizeof(buf), in)) {
				char out[600];
				buf[strcspn(buf, "\r\n")] = 0;
				int len = snprintf(out, sizeof(out), "pong %lu %s\n", ++n, buf);
				if (write(c, out, (size_t)len) < 0)
					break;
			}
			_exit(0);
		}
		close(c);
	}
}

_Noreturn static void lock(const char *path)
{
	FILE *f = fopen(path, "w");
	if (!f)
		die("open lock file");
	if (flock(fileno(f), LOCK_EX) < 0)
		die("flock");
	for (unsigned long n = 1;; n++) {
		rewind(f);
		fprintf(f, "%lu\n", n);
		fflush(f);
		nap_ms(100);
	}
}

_Noreturn static void perf(const char *path)
{
	struct perf_event_attr attr;
	memset(&attr, 0, sizeof(attr));
	attr.size = sizeof(attr);
	attr.type = PERF_TYPE_SOFTWARE;
	attr.config = PERF_COUNT_SW_TASK_CLOCK;
	attr.exclude_kernel = 1;
	if (syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0) < 0)
		die("perf_event_open");
	for (unsigned long n = 1;; n++) {
		char line[32];
		snprintf(line, sizeof(line), "%lu\n", n);
		write_state(path, line);
		nap_ms(100);
	}
}

static volatile sig_atomic_t hib_term;

static void on_term(int sig)
{
	(void)sig;
	hib_term = 1;
}

#define HIB_MAX 512

_Noreturn static void hib(int port, const char *flush, int with_perf)
{
	if (with_perf) {
		struct perf_event_attr attr;
		memset(&attr, 0, sizeof(attr));
		attr.size = sizeof(attr);
		attr.type = PERF_TYPE_SOFTWARE;
		attr.config = PERF_COUNT_SW_TASK_CLOCK;
		attr.exclude_kernel = 1;
		if (syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0) < 0)
			die("perf_event_open");
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_term; /* no SA_RESTART: poll returns EINTR */
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	static struct pollfd fds[HIB_MAX];
	static char bufs[HIB_MAX][1024];
	static size_t used[HIB_MAX];
	int n = 1;
	unsigned long total = 0;
	fds[0].fd = listen_on(port);
	fds[0].events = POLLIN;
	printf("listening %d\n", port);
	for (;;) {
		if (hib_term) {
			char line[64];
			int len = snprintf(line, sizeof(line), "total %lu\n", total);
			int f = open(flush, O_WRONLY | O_CREAT | O_TRUNC, 0644);
			if (f < 0 || write(f, line, (size_t)len) != len || fsync(f) < 0)
				die("flush");
			close(f);
			exit(0);
		}
		if (poll(fds, (nfds_t)n, -1) < 0)
			continue;
		if ((fds[0].revents & POLLIN) && n < HIB_MAX) {
			int c = accept(fds[0].fd, NULL, NULL);
			if (c >= 0) {
				fds[n].fd = c;
				fds[n].events = POLLIN;
				fds[n].revents = 0;
				used[n] = 0;
				n++;
			}
		}
		for (int i = 1; i < n; i++) {
			if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			ssize_t r = read(fds[i].fd, bufs[i] + used[i], sizeof(bufs[i]) - 1 - used[i]);
			int done = r <= 0;
			if (r > 0)
				used[i] += (size_t)r;
			char *nl;
			while (!done && (nl = memchr(bufs[i], '\n', used[i]))) {
				*nl = 0;
				if (nl > bufs[i] && nl[-1] == '\r')
					nl[-1] = 0;
				char out[1200];
				int len;
				if (!strncmp(bufs[i], "GET ", 4)) {
					len = snprintf(out, sizeof(out), "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
					done = 1;
				} else {
					len = snprintf(out, sizeof(out), "n %lu %s\n", ++total, bufs[i]);
				}
				if (write(fds[i].fd, out, (size_t)len) < 0)
					done = 1;
				size_t rest = used[i] - (size_t)(nl + 1 - bufs[i]);
				memmove(bufs[i], nl + 1, rest);
				used[i] = rest;
			}
			if (used[i] >= sizeof(bufs[i]) - 1)
				done = 1;
			if (done) {
				close(fds[i].fd);
				fds[i] = fds[n - 1];
				used[i] = used[n - 1];
				memcpy(bufs[i], bufs[n - 1], used[i]);
				n--;
				i--;
			}
		}
	}
}

static void on_child(int sig)
{
	(void)sig;
}

static void pause_and_reap(void)
{
	sigset_t chld, none;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigemptyset(&none);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	signal(SIGCHLD, on_child);
	for (;;) {
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
		sigsuspend(&none);
	}
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 3 && !strcmp(argv[1], "tree"))
		return tree(argv[2]);
	if (argc == 4 && !strcmp(argv[1], "heap"))
		heap(atol(argv[2]), atoi(argv[3]));
	if (argc == 3 && !strcmp(argv[1], "echo"))
		echo(atoi(argv[2]));
	if (argc == 3 && !strcmp(argv[1], "lock"))
		lock(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "perf"))
		perf(argv[2]);
	if ((argc == 4 || argc == 5) && !strcmp(argv[1], "hib"))
		hib(atoi(argv[2]), argv[3], argc == 5 && !strcmp(argv[4], "perf"));
	if (argc == 2 && !strcmp(argv[1], "pause"))
		pause_and_reap();
	fprintf(stderr, "usage: ckload tree STATEFILE | heap MIB PORT | echo PORT | lock FILE | perf FILE | hib PORT FLUSHFILE [perf] | pause\n");
	return 2;
}
