export const metadata = { title: "pg-cache-invalidator · Next.js example" };

export default function RootLayout({ children }) {
  return (
    <html lang="en">
      <body>{children}</body>
    </html>
  );
}
