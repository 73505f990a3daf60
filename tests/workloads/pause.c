/*
 * pause: the test node's pod sandbox program (what the kubelet's pause image runs).
 *
 * It holds the pod's namespaces and does nothing else: it sleeps in pause(), reaps every
 * child that is re-parented to it (it is PID 1 of the pod when containers share the pod's
 * PID namespace), and exits 0 on SIGTERM or SIGINT. Built statically by the test harness
 * with the host's gcc (tests/src/node/images.rs).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig)
{
	(void)sig;
	_exit(0);
}

static void on_child(int sig)
{
	int saved = errno;

	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	errno = saved;
}

static int handle(int sig, void (*fn)(int), int flags)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = fn;
	sa.sa_flags = flags;
	sigemptyset(&sa.sa_mask);
	return sigaction(sig, &sa, NULL);
}

int main(void)
{
	static const char msg[] = "pause: cannot install signal handlers\n";

	if (handle(SIGTERM, on_stop, 0) || handle(SIGINT, on_stop, 0) ||
	    handle(SIGCHLD, on_child, SA_NOCLDSTOP | SA_RESTART)) {
		(void)!write(2, msg, sizeof(msg) - 1);
		return 1;
	}
	for (;;)
		pause();
	return 42; /* not reached */
}
